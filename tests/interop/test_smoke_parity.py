import pytest

import jpeft
from tests import parity

TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "bart": ["q_proj", "v_proj"],
}


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_both_directions(arch, tiny, tmp_path):
    pair = tiny(arch)
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch])
    if arch == "bert":
        kwargs["task_type"] = "SEQ_CLS"
    ref = parity.torch_peft_save(pair, kwargs, tmp_path / "torch")
    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path / "torch")
    got = parity.jax_logits(loaded, pair.inputs())
    assert abs(got - ref).max() <= parity.ATOL

    mine = jpeft.get_peft_model(pair.flax_model, jpeft.LoraConfig(**kwargs))
    parity.perturb_jpeft_adapter(mine)
    mine.save_pretrained(tmp_path / "jax")
    torch_model = parity.torch_peft_load(pair, tmp_path / "jax")
    assert (
        abs(parity.torch_logits(torch_model, pair.inputs()) - parity.jax_logits(mine, pair.inputs())).max()
        <= parity.ATOL
    )
