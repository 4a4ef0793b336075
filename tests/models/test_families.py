"""jpeft's family models against transformers' torch classes: logits, generation, loading, saving.

Each tiny config of ``tests/models/families.py`` (every family, every rope type) is built in
torch, saved with ``save_pretrained`` and loaded by jpeft. fp32 logits with a left-padded row
must agree within 1e-5 at the real positions, and greedy generation must give the same 16 new
tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.errors import CheckpointError, ConfigError
from tests import parity
from tests.models import families as fam

NAMES = list(fam.CONFIGS)
LENGTH = 14  # longer than the dynamic/longrope/yarn/llama3 original lengths and the sliding windows


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_generation_match_torch(name, root, record_property):
    import torch

    folder = fam.saved(name, root)
    model = jpeft.models.AutoModelForCausalLM.from_pretrained(folder)
    vocab = model.config.vocab_size
    ids, mask = fam.inputs(length=LENGTH, vocab=vocab)
    torch_model = fam.torch_model(name)
    want = fam.torch_logits(torch_model, ids, mask)
    got = np.asarray(model(ids, attention_mask=mask).logits)
    diff = parity.assert_close(fam.real(got, mask), fam.real(want, mask), f"{name}: logits")
    record_property("logits_max_abs_diff", diff)

    prompt_ids, prompt_mask = ids[:, :8], mask[:, :8]
    if model.config.reencode_at is not None:  # Phi-3 longrope: see fam.torch_greedy
        theirs = fam.torch_greedy(torch_model, prompt_ids, prompt_mask, 16)
        mine = np.asarray(model.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=16, eos_token_id=None))
        np.testing.assert_array_equal(mine, theirs, err_msg=f"{name}: greedy generation")
        return
    with torch.no_grad():
        theirs = torch_model.generate(
            input_ids=torch.from_numpy(prompt_ids).long(),
            attention_mask=torch.from_numpy(prompt_mask).long(),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    mine = np.asarray(model.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=16, eos_token_id=None))
    np.testing.assert_array_equal(mine, theirs, err_msg=f"{name}: greedy generation")



def test_scan_layers_gives_the_same_logits_generation_and_checkpoint(root, tmp_path):
    folder = fam.saved("qwen3", root)
    plain = jpeft.models.AutoModelForCausalLM.from_pretrained(folder)
    scanned = jpeft.models.AutoModelForCausalLM.from_pretrained(folder, scan_layers=True)
    ids, mask = fam.inputs(length=LENGTH)
    parity.assert_close(
        fam.real(np.asarray(scanned(ids, attention_mask=mask).logits), mask),
        fam.real(np.asarray(plain(ids, attention_mask=mask).logits), mask),
        "scan_layers logits",
    )
    np.testing.assert_array_equal(
        np.asarray(scanned.generate(ids[:, :6], attention_mask=mask[:, :6], max_new_tokens=8)),
        np.asarray(plain.generate(ids[:, :6], attention_mask=mask[:, :6], max_new_tokens=8)),
    )
    scanned.save_pretrained(tmp_path / "scanned")
    torch_model = __import__("transformers").Qwen3ForCausalLM.from_pretrained(tmp_path / "scanned").eval()
    parity.assert_close(
        fam.real(fam.torch_logits(torch_model, ids, mask), mask),
        fam.real(np.asarray(plain(ids, attention_mask=mask).logits), mask),
        "scanned save -> torch",
    )


def test_bf16_logits_within_bf16_rounding_of_torch(root):
    import torch

    folder = fam.saved("llama-llama3", root)
    model = jpeft.models.AutoModelForCausalLM.from_pretrained(folder, dtype=jnp.bfloat16)
    assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    torch_model = fam.torch_model("llama-llama3").to(torch.bfloat16)
    ids, mask = fam.inputs(length=LENGTH)
    want = fam.real(fam.torch_logits(torch_model, ids, mask), mask)
    got = fam.real(np.asarray(model(ids, attention_mask=mask).logits, np.float32), mask)
    # bf16 keeps 8 bits of mantissa: one rounding step of a logit of size ~|want| is |want| * 2^-8; the two
    # frameworks round intermediate sums in different orders, so allow a few steps of the largest logit
    tolerance = 4 * float(np.abs(want).max()) * 2**-8
    assert parity.max_diff(got, want) <= tolerance, (parity.max_diff(got, want), tolerance)


def test_sharded_mixed_dtype_checkpoint_loads(root, tmp_path):
    import torch

    torch_model = fam.torch_model("llama-default")
    for name, p in torch_model.named_parameters():  # mixed dtypes within the files
        if "mlp" in name:
            p.data = p.data.to(torch.bfloat16)
        elif "self_attn.q_proj" in name:
            p.data = p.data.to(torch.float16)
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    model = jpeft.models.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    want = torch_model.float()
    ids, mask = fam.inputs(length=LENGTH)
    parity.assert_close(
        fam.real(np.asarray(model(ids, attention_mask=mask).logits), mask),
        fam.real(fam.torch_logits(want, ids, mask), mask),
        "sharded mixed-dtype load",
    )


def test_save_pretrained_loads_in_torch(root, tmp_path):
    import transformers

    model = jpeft.models.AutoModelForCausalLM.from_config(fam.torch_config("llama-bias-tied").to_dict(), key=3)
    model.save_pretrained(tmp_path / "out", max_shard_size="30KB")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(torch_model).__name__ == "LlamaForCausalLM"
    ids, mask = fam.inputs(length=LENGTH)
    parity.assert_close(
        fam.real(fam.torch_logits(torch_model, ids, mask), mask),
        fam.real(np.asarray(model(ids, attention_mask=mask).logits), mask),
        "jpeft save -> torch",
    )


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rope_scaling", {"rope_type": "ntk-by-parts", "factor": 2.0}, "rope_type"),
        ("attention_dropout", 0.1, "attention_dropout"),
        ("quantization_config", {"quant_method": "gptq"}, "quantization_config"),
        ("hidden_act", "mish", "hidden_act"),
        ("model_type", "gpt_bigcode", "gpt_bigcode"),
    ],
)
def test_unsupported_config_fields_fail_loud(field, value, match):
    raw = {**fam.BASE, "model_type": "llama", field: value}
    with pytest.raises(ConfigError, match=match):
        jpeft.models.AutoModelForCausalLM.from_config(raw)


def test_checkpoint_that_does_not_fit_its_config_is_refused(root, tmp_path):
    import json
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(fam.saved("llama-default", root), folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.layers.2"):
        jpeft.models.AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "model_type,field,value,match",
    [
        ("phi3", "resid_pdrop", 0.1, "resid_pdrop"),
        ("phi3", "rope_scaling", {"type": "linear", "factor": 2.0}, "longrope"),
        ("gemma2", "query_pre_attn_scalar", "256", "query_pre_attn_scalar"),
        ("gemma2", "hidden_activation", "mish", "hidden_activation"),
        ("llama", "final_logit_softcapping", 30.0, "final_logit_softcapping"),
        ("gemma3_text", "use_bidirectional_attention", True, "bidirectional"),
    ],
)
def test_new_family_fields_fail_loud(model_type, field, value, match):
    raw = {**fam.BASE, "model_type": model_type, "head_dim": 8, field: value}
    with pytest.raises(ConfigError, match=match):
        jpeft.models.AutoModelForCausalLM.from_config(raw)


def test_gemma3_reads_both_rope_layouts_and_says_it_ignores_the_attention_cap():
    old = {**fam.CONFIGS["gemma3"][1], "model_type": "gemma3_text"}
    new = {k: v for k, v in old.items() if k not in ("rope_scaling", "rope_local_base_freq")}
    new["rope_parameters"] = {  # transformers 5's layout
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    }
    a, b = jpeft.models.config_from(old), jpeft.models.config_from(new)
    assert (a.rope, a.rope_local) == (b.rope, b.rope_local)
    assert a.rope.rope_type == "linear" and a.rope_local is not None and a.rope_local.base == 100.0
    assert a.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    with pytest.warns(UserWarning, match="never applies"):
        jpeft.models.config_from({**old, "attn_logit_softcapping": 50.0})
