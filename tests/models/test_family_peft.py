"""Every jpeft method on jpeft's own Llama and Qwen3, both ways against torch PEFT on transformers' classes.

The base weights come from transformers' torch class (saved, then loaded by jpeft). For each
method row: a torch PEFT adapter with non-trivial weights loads in jpeft with equal logits, and
a jpeft adapter loads in torch PEFT (its "missing adapter keys" warning fails the test) with
equal logits; fp32, max abs diff <= 1e-5 at the real positions of a left-padded batch. Prompt
methods also generate the same greedy tokens as torch PEFT.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import jpeft
from tests import parity
from tests.bindings.test_nnx import CONFIGS as LAYER_CONFIGS
from tests.models import families as fam

FAMILIES = ("llama-llama3", "qwen3", "gemma3", "phi3-short")
# Phi-3 keeps q/k/v and gate/up fused: PEFT (and jpeft) target the fused names
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}
PROMPT_CONFIGS: dict[str, tuple[str, dict]] = {
    "prompt-tuning": ("PROMPT_TUNING", dict(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "p-tuning": ("P_TUNING", dict(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)),
    "prefix-tuning": ("PREFIX_TUNING", dict(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix-projection": (
        "PREFIX_TUNING", dict(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8)
    ),
}
# layer rows on both families; LoRA's option rows on Llama only (they share all code with "lora")
CASES = [
    *((row, "llama-llama3") for row in LAYER_CONFIGS),
    *((row, "qwen3") for row in ("lora", "ia3", "vera", "adalora", "loha", "lora-dora")),
    # every method on Gemma 3 (scaled embedding, sandwich norms, q/k norms, two ropes) and Phi-3 (fused)
    *((row, family) for row in LAYER_CONFIGS for family in ("gemma3", "phi3-short")),
    *((row, family) for row in PROMPT_CONFIGS for family in FAMILIES),
    # scan_layers=True: stacked blocks, adapters carried through the scan, per-layer PEFT keys
    *((row, "qwen3-scan") for row in ("lora", "ia3", "prefix-tuning")),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("family-peft"))


def _for_family(kwargs: dict, family: str) -> dict:
    """A method row's config for ``family``: Phi-3's fused module names in place of q/k/v/gate/up; Gemma's
    tied head out of ``modules_to_save``."""

    def rename(names):
        return list(dict.fromkeys(FUSED.get(n, n) for n in names))

    out = dict(kwargs)
    if family.startswith("gemma") and out.get("modules_to_save") == ["lm_head"]:
        out["modules_to_save"] = ["norm"]  # Gemma ties lm_head to embed_tokens: jpeft refuses to copy it (tested)
    if not family.startswith("phi3"):
        return out
    for field in ("target_modules", "feedforward_modules"):
        if isinstance(out.get(field), list):
            out[field] = rename(out[field])
    for field in ("rank_pattern", "alpha_pattern"):
        if out.get(field):
            out[field] = {FUSED.get(k, k): v for k, v in out[field].items()}
    return out


def _logits(model, ids, mask) -> np.ndarray:
    out = model(ids, attention_mask=mask)
    return np.asarray(getattr(out, "logits", out))


def _compare(got, want, mask, what) -> float:
    nvt = got.shape[1] - mask.shape[1]  # virtual tokens: logits cover them too
    full = np.concatenate([np.ones((mask.shape[0], nvt), mask.dtype), mask], axis=1)
    return parity.assert_close(fam.real(got, full), fam.real(want, full), what)


@pytest.mark.parametrize("row,family", CASES, ids=[f"{r}-{f}" for r, f in CASES])
def test_method_parity_with_torch_peft(row, family, root, tmp_path, record_property):
    import peft
    import torch

    peft_type, kwargs = {**LAYER_CONFIGS, **PROMPT_CONFIGS}[row]
    prompt = row in PROMPT_CONFIGS
    torch_config, jpeft_config = parity.method_configs(peft_type, **_for_family(kwargs, family))
    scan = family.endswith("-scan")
    family = family.removesuffix("-scan")
    model = jpeft.models.AutoModelForCausalLM.from_pretrained(fam.saved(family, root), scan_layers=scan)
    ids, mask = fam.inputs(length=10)
    base = _logits(model, ids, mask)

    # torch PEFT -> jpeft
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(fam.torch_model(family), torch_config)
    parity.perturb_torch_trainable(torch_model)
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "from_torch")
    want = fam.torch_logits(torch_model, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = jpeft.PeftModel.from_pretrained(model, tmp_path / "from_torch")
    got = _logits(loaded, ids, mask)
    assert parity.max_diff(got[:, -ids.shape[1]:], base) > 1e-3, "the adapter must change the output"
    record_property("torch_to_jpeft_max_abs_diff", _compare(got, want, mask, f"{row}/{family}: torch -> jpeft"))
    if prompt:
        _same_generation(torch_model, loaded, ids, mask, f"{row}/{family}")

    # jpeft -> torch PEFT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine_model = jpeft.get_peft_model(model, jpeft_config, key=jax.random.key(3))
    if not prompt:
        assert set(mine_model.targeted_modules()) == set(torch_model.base_model.targeted_module_names)
    parity.perturb_trainable(mine_model)
    mine = _logits(mine_model, ids, mask)
    mine_model.save_pretrained(tmp_path / "from_jpeft")
    theirs_model = parity.peft_from_pretrained(fam.torch_model(family), tmp_path / "from_jpeft")
    theirs = fam.torch_logits(theirs_model, ids, mask)
    record_property("jpeft_to_torch_max_abs_diff", _compare(mine, theirs, mask, f"{row}/{family}: jpeft -> torch"))


def _same_generation(torch_model, peft_model, ids, mask, what) -> None:
    import torch

    with torch.no_grad():
        theirs = torch_model.generate(
            input_ids=torch.from_numpy(ids[:, :6]).long(), attention_mask=torch.from_numpy(mask[:, :6]).long(),
            max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
        ).numpy()
    mine = np.asarray(peft_model.generate(ids[:, :6], attention_mask=mask[:, :6], max_new_tokens=16, eos_token_id=None))
    np.testing.assert_array_equal(mine, theirs, err_msg=f"{what}: greedy generation")


def test_lora_generation_and_mixed_batches_match_torch_peft(root, tmp_path):
    """Two LoRA adapters: greedy generation with one, and a mixed batch, as torch PEFT."""
    import peft
    import torch

    family = "qwen3"
    torch.manual_seed(2)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    torch_model = peft.get_peft_model(fam.torch_model(family), peft.LoraConfig(**kwargs), adapter_name="a")
    torch_model.add_adapter("b", peft.LoraConfig(**kwargs))
    parity.perturb_torch_trainable(torch_model)
    for name in ("a", "b"):  # perturb_torch_trainable touches the active adapter only
        torch_model.set_adapter(name)
        parity.perturb_torch_trainable(torch_model, seed=7 if name == "b" else 1)
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "two")
    model = jpeft.models.AutoModelForCausalLM.from_pretrained(fam.saved(family, root))
    mine = jpeft.PeftModel.from_pretrained(model, tmp_path / "two" / "a", adapter_name="a")
    mine.load_adapter(tmp_path / "two" / "b", adapter_name="b")
    ids, mask = fam.inputs(length=10)
    names = ["a", "b"]
    with torch.no_grad():
        want = torch_model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(), adapter_names=names
        ).logits.numpy()
    got = np.asarray(mine(ids, attention_mask=mask, adapter_names=names).logits)
    parity.assert_close(fam.real(got, mask), fam.real(want, mask), "mixed batch")
    torch_model.set_adapter("b")
    mine.set_adapter("b")
    _same_generation(torch_model, mine, ids, mask, "lora b")


def test_tied_lm_head_in_modules_to_save_and_prompt_generation_past_the_longrope_switch_are_refused(root):
    gemma = jpeft.models.AutoModelForCausalLM.from_pretrained(fam.saved("gemma3", root))
    with pytest.raises(jpeft.ConfigError, match="tied to model.embed_tokens"):
        jpeft.get_peft_model(gemma, jpeft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    phi3 = jpeft.models.AutoModelForCausalLM.from_pretrained(fam.saved("phi3", root))
    tuned = jpeft.get_peft_model(phi3, jpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    ids, mask = fam.inputs(length=6)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        tuned.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert tuned.generate(ids, attention_mask=mask, max_new_tokens=2).shape == (2, 8)
