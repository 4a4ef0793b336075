"""One training step in jpeft equals one in torch PEFT, from the same adapter on the same weights.

A perturbed torch PEFT LoRA adapter is saved by ``peft``; jpeft loads it trainable and takes one
``make_train_step`` step (the fused LM-head loss, or the plain one) with SGD at learning rate 1, so the
adapter moves by exactly its gradient; the result is saved by jpeft and loaded back by ``peft``. torch
takes the same step (``model(..., labels=ids).loss.backward()``, ``torch.optim.SGD(lr=1)``); LoRA and DoRA. The two
trained adapters must agree tensor by tensor, and so must their logits. Tiny Llama has no dropout,
so train mode is deterministic in both frameworks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from tests import parity

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "lora_dropout": 0.0}


def _torch_step(pair, folder, inputs):
    import torch

    model = parity.torch_peft_load(pair, folder, is_trainable=True).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.as_tensor(inputs["input_ids"], dtype=torch.long)
    loss = model(input_ids=ids, attention_mask=torch.as_tensor(inputs["attention_mask"]), labels=ids).loss
    loss.backward()
    opt.step()
    lora = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if "lora_" in k}
    return float(loss), lora, parity.torch_logits(model.eval(), inputs)


@pytest.mark.parametrize(
    ("fused_loss", "dora"), [(True, False), (False, False), (True, True)], ids=["fused", "plain", "dora"]
)
def test_one_train_step_matches_torch_peft(fused_loss, dora, tiny, tmp_path):
    pair = tiny("llama")
    inputs = pair.inputs(batch=2, length=7)
    start = tmp_path / "start"
    parity.torch_peft_save(pair, {**LORA, "use_dora": dora}, start)

    model = jpeft.PeftModel.from_pretrained(pair.flax_model, start, is_trainable=True)
    trainer = jpeft.train.make_train_step(model, optax.sgd(1.0), fused_loss=fused_loss)
    state, metrics = trainer.step(
        trainer.init(jax.random.key(0)), trainer.frozen(), {k: jnp.asarray(v) for k, v in inputs.items()}
    )
    model.params = trainer.params(state)
    model.save_pretrained(tmp_path / "jpeft")
    trained_by_jpeft = parity.torch_peft_load(pair, tmp_path / "jpeft")
    jpeft_lora = {k: v.numpy() for k, v in trained_by_jpeft.state_dict().items() if "lora_" in k}

    torch_loss, torch_lora, torch_logits = _torch_step(pair, start, inputs)
    np.testing.assert_allclose(float(metrics["loss"]), torch_loss, rtol=1e-6)
    before = {
        k: v.numpy() for k, v in parity.torch_peft_load(pair, start).state_dict().items() if "lora_" in k
    }
    # A and B (and DoRA's magnitude vector) of 3 modules in 2 layers
    assert jpeft_lora.keys() == torch_lora.keys() and len(torch_lora) == (3 if dora else 2) * 2 * 3
    moved = max(float(np.max(np.abs(torch_lora[k] - before[k]))) for k in torch_lora)
    assert moved > 1e-3  # the step really moved the adapter (lr 1: by its gradient)
    weights = max(
        parity.assert_close(jpeft_lora[k], torch_lora[k], f"{k} after one step") for k in torch_lora
    )
    logits = parity.assert_close(parity.jax_logits(model, inputs), torch_logits, "logits after one step")
    print(
        f"train-step parity ({'fused' if fused_loss else 'plain'}{', DoRA' if dora else ''}):"
        f" weights {weights:.2e}, logits {logits:.2e}"
    )
