"""Sequence classification on jpeft's families against transformers' ``...ForSequenceClassification``.

The classifier (``score``, last non-padding token) is checked on every family; PEFT's
``task_type="SEQ_CLS"`` adapters go both ways on Llama and Gemma 3 (LoRA, IA3, prefix tuning and
prompt tuning, with ``score`` in ``modules_to_save``), fp32 logits within 1e-5. Row 0 of the
batch is right-padded and row 1 left-padded, so the pooled position differs per row.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import optax
import pytest

import jpeft
from tests import parity
from tests.models import families as fam

CLASSIFIERS = ("llama-llama3", "mistral-window", "qwen2-window-tied", "qwen3", "gemma2", "gemma3", "phi3")
SEQ_CLS_ROWS: dict[str, tuple[str, dict]] = {
    "lora": ("LORA", dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "ia3": ("IA3", dict(task_type="SEQ_CLS", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "prefix-tuning": ("PREFIX_TUNING", dict(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "prompt-tuning": ("PROMPT_TUNING", dict(task_type="SEQ_CLS", num_virtual_tokens=3)),
}
CASES = [(row, family) for family in ("llama-llama3", "gemma3") for row in SEQ_CLS_ROWS]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("family-seq-cls"))


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    ids, mask = fam.inputs(length=10)
    ids[0, -2:], mask[0, -2:] = 0, 0  # row 0 right-padded (pad id 0), row 1 left-padded
    return ids, mask


def _torch_logits(model, ids, mask) -> np.ndarray:
    return fam.torch_logits(model, ids, mask)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_logits_match_torch(name, root, record_property):
    torch_model = fam.torch_model(name, head="seq_cls")
    model = jpeft.models.AutoModelForSequenceClassification.from_pretrained(fam.saved(name, root, "seq_cls"))
    assert model.torch_class_name == type(torch_model).__name__
    ids, mask = _inputs()
    got = np.asarray(model(ids, attention_mask=mask).logits)
    assert got.shape == (2, 3)
    record_property("max_abs_diff", parity.assert_close(got, _torch_logits(torch_model, ids, mask), name))


def test_classifier_from_a_causal_checkpoint_and_back_to_torch(root, tmp_path):
    """A causal LM's checkpoint: ``score`` is new (warned), ``lm_head`` dropped; the save loads in torch."""
    import transformers

    with pytest.warns(UserWarning, match="no `score` weights"):
        model = jpeft.models.AutoModelForSequenceClassification.from_pretrained(fam.saved("gemma2", root), num_labels=4)
    assert model.score.kernel.shape == (32, 4)
    model.save_pretrained(tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["architectures"] == ["Gemma2ForSequenceClassification"] and len(config["id2label"]) == 4
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "clf", attn_implementation="eager"
    ).eval()
    ids, mask = _inputs()
    parity.assert_close(np.asarray(model(ids, attention_mask=mask).logits), _torch_logits(torch_model, ids, mask),
                        "jpeft save -> torch")


def test_pooling_without_pad_token_follows_transformers(root):
    cfg = dict(fam.BASE, model_type="llama")  # no pad_token_id
    model = jpeft.models.AutoModelForSequenceClassification.from_config(cfg, num_labels=2)
    ids, _ = fam.inputs(batch=1)
    one = np.asarray(model(ids).logits)
    assert one.shape == (1, 2)
    with pytest.raises(ValueError, match="pad_token_id"):
        model(np.concatenate([ids, ids]))


@pytest.mark.parametrize("row,family", CASES, ids=[f"{r}-{f}" for r, f in CASES])
def test_seq_cls_adapters_both_ways(row, family, root, tmp_path, record_property):
    import peft
    import torch

    peft_type, kwargs = SEQ_CLS_ROWS[row]
    torch_config, jpeft_config = parity.method_configs(peft_type, **kwargs)
    model = jpeft.models.AutoModelForSequenceClassification.from_pretrained(fam.saved(family, root, "seq_cls"))
    ids, mask = _inputs()
    base = np.asarray(model(ids, attention_mask=mask).logits)

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(fam.torch_model(family, head="seq_cls"), torch_config)
    parity.perturb_torch_trainable(torch_model)
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "from_torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = jpeft.PeftModel.from_pretrained(model, tmp_path / "from_torch")
    got = np.asarray(loaded(ids, attention_mask=mask).logits)
    assert parity.max_diff(got, base) > 1e-3, "the adapter must change the output"
    want = _torch_logits(torch_model, ids, mask)
    record_property("torch_to_jpeft_max_abs_diff", parity.assert_close(got, want, f"{row}/{family}: torch -> jpeft"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine_model = jpeft.get_peft_model(model, jpeft_config, key=jax.random.key(3))
    parity.perturb_trainable(mine_model)
    mine = np.asarray(mine_model(ids, attention_mask=mask).logits)
    mine_model.save_pretrained(tmp_path / "from_jpeft")
    saved = parity.saved_tensors(tmp_path / "from_jpeft")
    # modules_to_save, as PEFT saves it (prompt methods' keys lack the LoRA-style ``model.`` level)
    assert {"base_model.model.score.weight", "base_model.score.weight"} & set(saved), sorted(saved)
    theirs_model = parity.peft_from_pretrained(fam.torch_model(family, head="seq_cls"), tmp_path / "from_jpeft")
    theirs = _torch_logits(theirs_model, ids, mask)
    record_property("jpeft_to_torch_max_abs_diff", parity.assert_close(mine, theirs, f"{row}/{family}: jpeft -> torch"))


def test_seq_cls_training_trains_the_head_and_lowers_the_loss(root):
    model = jpeft.models.AutoModelForSequenceClassification.from_pretrained(fam.saved("gemma3", root, "seq_cls"))
    peft_model = jpeft.get_peft_model(model, jpeft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))
    assert "score" in peft_model.adapters["default"]["modules_to_save"], "score is trained (modules_to_save)"
    ids, mask = _inputs()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 2], np.int32)}
    trainer = jpeft.train.make_train_step(peft_model, optax.adam(3e-2))  # the loss from task_type
    state = trainer.init(jax.random.key(0))
    losses = []
    for _ in range(6):
        state, metrics = trainer.step(state, trainer.frozen(), batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
