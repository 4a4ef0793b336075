"""Numeric parity of jpeft's LoRA with torch PEFT, for every LoRA option, in both directions.

Each row of ``CASES`` is one ``LoraConfig`` on one tiny random model (``tests/tiny_models.py``);
every test runs over the whole table:

- ``test_torch_to_jpeft`` (a): torch PEFT builds the adapter, its trainable tensors are
  perturbed (so ``lora_B != 0`` and every option shows in the output), ``peft`` saves it and
  ``jpeft.PeftModel.from_pretrained`` loads it: the logits agree within ``parity.ATOL``.
- ``test_jpeft_to_torch`` (b): jpeft builds the adapter (``get_peft_model`` +
  ``perturb_jpeft_adapter``) and saves it; ``peft.PeftModel.from_pretrained`` loads it (failing
  on PEFT's missing-keys warning): the logits agree.
- ``test_jpeft_checkpoint_format`` (b): jpeft's folder holds the safetensors keys and shapes,
  and an ``adapter_config.json`` with the keys and values, of torch PEFT's save of the same
  config on the same model.
- ``test_jpeft_merge`` (b): ``merge_and_unload()`` gives the unmerged logits.

Both sides' adapters must move the logits by more than ``_MIN_ADAPTER_EFFECT`` (100x ATOL),
so no parity check passes because an option had no effect. Weights always travel from one
side to the other and are never drawn independently on both sides, so
``init_lora_weights=False`` (random A and B) is compared meaningfully. PiSSA and OLoRA rewrite
the base weights when the adapter is created *and* when it is loaded, on both sides, so every
load starts from the original base model (``pair.torch_model()`` / ``pair.flax_model``, never
the rewritten one) and the two residual bases must agree too.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from safetensors.numpy import load_file

import jpeft
from tests import parity

# Fields whose values differ between two saves for reasons unrelated to the format:
# base_model_name_or_path is the torch folder on one side and the Flax model's name on the other.
_CONFIG_VALUE_EXEMPT = {"base_model_name_or_path"}
# The adapter must move the logits by at least this much, or a parity check proves nothing.
_MIN_ADAPTER_EFFECT = 1e-3


# {test name: {case id: reason}}: failures caused by jpeft bugs, marked strict so a fix is noticed.
XFAIL: dict[str, dict[str, str]] = {}


def case(case_id: str, arch: str, *, tied_embedding: bool = False, **lora_kwargs):
    """One row of the table: ``tied_embedding`` marks configs adapting an embedding tied to the head."""
    return pytest.param(arch, lora_kwargs, tied_embedding, id=case_id)


CASES = [
    # ---------------------------------------------------------------- GPT-2 (Conv1D targets)
    # fan_in_fan_out is corrected to True for Conv1D (checked below on every GPT-2 case);
    # lora_dropout is off in eval on both sides.
    case(
        "gpt2-causal_lm-list-fan_in_fan_out",
        "gpt2",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        lora_dropout=0.1,
        task_type="CAUSAL_LM",
    ),
    case(
        "gpt2-regex-rslora-bias_all",
        "gpt2",
        r=4,
        lora_alpha=16,
        target_modules=r"transformer\.h\.\d\.mlp\.c_(fc|proj)",
        use_rslora=True,
        bias="all",
    ),
    # wte is tied to lm_head: the merge folds the delta into the head too (PEFT warns likewise).
    case(
        "gpt2-wte_embedding-gaussian",
        "gpt2",
        tied_embedding=True,
        r=2,
        lora_alpha=4,
        target_modules=["wte", "c_attn"],
        init_lora_weights="gaussian",
        task_type="CAUSAL_LM",
    ),
    case(
        "gpt2-layers_to_transform-layers_pattern-bias_lora_only",
        "gpt2",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        layers_to_transform=[1],
        layers_pattern="h",
        bias="lora_only",
        task_type="CAUSAL_LM",
    ),
    case(
        "gpt2-pissa",
        "gpt2",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "mlp.c_proj"],
        init_lora_weights="pissa",
    ),
    case(
        "gpt2-dora-conv1d",
        "gpt2",
        r=4,
        lora_alpha=8,
        target_modules=["c_proj"],
        use_dora=True,
        task_type="CAUSAL_LM",
    ),
    case(
        "gpt2-init_false-lora_bias",
        "gpt2",
        r=4,
        lora_alpha=8,
        target_modules=["c_fc"],
        init_lora_weights=False,
        lora_bias=True,
    ),
    # ---------------------------------------------------------------- Llama (GQA, no biases)
    case("llama-all_linear", "llama", r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    case(
        "llama-exclude_list",
        "llama",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        exclude_modules=["model.layers.0.self_attn.k_proj", "o_proj"],
        task_type="CAUSAL_LM",
    ),
    case(
        "llama-regex-exclude_regex",
        "llama",
        r=4,
        lora_alpha=8,
        target_modules=r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj",
        exclude_modules=r"model\.layers\.1\.mlp\..*",
    ),
    case(
        "llama-layers_to_transform_int",
        "llama",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        layers_to_transform=1,
        task_type="CAUSAL_LM",
    ),
    case(
        "llama-rank_pattern-alpha_pattern-rslora",
        "llama",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 32, "down_proj": 3},
        use_rslora=True,  # per-layer scaling lora_alpha / sqrt(r) with the per-layer r and alpha
        task_type="CAUSAL_LM",
    ),
    case(
        "llama-embed_tokens-dora",
        "llama",
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj", "v_proj"],
        use_dora=True,
        task_type="CAUSAL_LM",
    ),
    case(
        "llama-embed_tokens-init_false-modules_to_save_lm_head",
        "llama",
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "o_proj"],
        init_lora_weights=False,
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    ),
    case(
        "llama-olora",
        "llama",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "down_proj"],
        init_lora_weights="olora",
    ),
    # ---------------------------------------------------------------- BERT (sequence classification)
    case(
        "bert-seq_cls-modules_to_save_pooler",
        "bert",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        modules_to_save=["pooler.dense"],
        task_type="SEQ_CLS",
    ),
    case(
        "bert-word_embeddings-gaussian",
        "bert",
        r=4,
        lora_alpha=8,
        target_modules=["word_embeddings", "key"],
        init_lora_weights="gaussian",
        task_type="SEQ_CLS",
    ),
    case(
        "bert-dora-embedding_and_linear",
        "bert",
        r=4,
        lora_alpha=8,
        target_modules=["word_embeddings", "query", "intermediate.dense"],
        use_dora=True,
        task_type="SEQ_CLS",
    ),
    case(
        "bert-olora",
        "bert",
        r=4,
        lora_alpha=8,
        target_modules=["query", "intermediate.dense"],
        init_lora_weights="olora",
        task_type="SEQ_CLS",
    ),
    case(
        "bert-all_linear-bias_all",
        "bert",
        r=2,
        lora_alpha=4,
        target_modules="all-linear",
        bias="all",
        task_type="SEQ_CLS",
    ),
    case(
        "bert-lora_bias-bias_lora_only",
        "bert",
        r=4,
        lora_alpha=8,
        target_modules=["value", "output.dense"],
        lora_bias=True,
        bias="lora_only",
        task_type="SEQ_CLS",
    ),
    # No task_type: the classifier is a plain LoRA target here, not a modules_to_save copy.
    case(
        "bert-no_task-regex-rslora",
        "bert",
        r=4,
        lora_alpha=8,
        target_modules=r"bert\.encoder\.layer\.\d\.attention\.self\.(query|key)|classifier",
        use_rslora=True,
    ),
    # ---------------------------------------------------------------- BART (encoder-decoder)
    case(
        "bart-seq2seq-bias_all",
        "bart",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        bias="all",
        task_type="SEQ_2_SEQ_LM",
    ),
    case(
        "bart-regex-lora_bias-rslora",
        "bart",
        r=4,
        lora_alpha=4,
        target_modules=r"model\.(en|de)coder\.layers\.\d\.(fc1|encoder_attn\.k_proj)",
        lora_bias=True,
        use_rslora=True,
        task_type="SEQ_2_SEQ_LM",
    ),
    case(
        "bart-layers_to_transform-layers_pattern",
        "bart",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "fc2"],
        layers_to_transform=[0],
        layers_pattern="layers",
        task_type="SEQ_2_SEQ_LM",
    ),
    # 32 linear layers: the expanded list is compacted to suffixes before saving (>= 20 names).
    case(
        "bart-all_linear-compacted",
        "bart",
        r=2,
        lora_alpha=4,
        target_modules="all-linear",
        task_type="SEQ_2_SEQ_LM",
    ),
    case(
        "bart-pissa",
        "bart",
        r=4,
        lora_alpha=8,
        target_modules=["k_proj", "out_proj"],
        init_lora_weights="pissa",
        task_type="SEQ_2_SEQ_LM",
    ),
    case(
        "bart-dora-exclude",
        "bart",
        r=4,
        lora_alpha=8,
        target_modules=["v_proj", "fc1"],
        exclude_modules=["model.encoder.layers.0.fc1"],
        use_dora=True,
        task_type="SEQ_2_SEQ_LM",
    ),
]


# --------------------------------------------------------------------------- helpers


def _saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


def _saved_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _semantic(field: str, value):
    """A config value in a form where two equivalent saves compare equal."""
    # PEFT keeps target_modules and exclude_modules as sets and writes them as lists in hash
    # order (which changes from run to run); modules_to_save order carries no meaning either.
    if field in ("target_modules", "exclude_modules", "modules_to_save") and isinstance(value, list):
        return frozenset(value)
    return value


def _assert_same_config(jax_cfg: dict, torch_cfg: dict) -> None:
    assert set(jax_cfg) == set(torch_cfg), (
        f"adapter_config.json keys: only jpeft {sorted(set(jax_cfg) - set(torch_cfg))}, "
        f"only peft {sorted(set(torch_cfg) - set(jax_cfg))}"
    )
    assert jax_cfg["peft_type"] == torch_cfg["peft_type"] == "LORA"
    target_jax, target_torch = jax_cfg["target_modules"], torch_cfg["target_modules"]
    assert type(target_jax) is type(target_torch), (target_jax, target_torch)
    assert _semantic("target_modules", target_jax) == _semantic("target_modules", target_torch)
    differing = {
        field: (jax_cfg[field], torch_cfg[field])
        for field in torch_cfg
        if field not in _CONFIG_VALUE_EXEMPT
        and _semantic(field, jax_cfg[field]) != _semantic(field, torch_cfg[field])
    }
    assert not differing, f"adapter_config.json values (jpeft, peft): {differing}"


def _conv1d_targeted(pair, kwargs) -> bool:
    """Whether jpeft will see GPT-2 Conv1D targets (every GPT-2 case targets some)."""
    return pair.arch == "gpt2" and not kwargs.get("fan_in_fan_out", False)


# --------------------------------------------------------------------------- the tests


def _jpeft_adapter(pair, lora_kwargs):
    """jpeft's adapter for ``lora_kwargs`` with non-trivial weights; checks the Conv1D fan_in_fan_out fix."""
    config = jpeft.LoraConfig(**lora_kwargs)
    if _conv1d_targeted(pair, lora_kwargs):
        # jpeft corrects the flag and warns, as PEFT does (the saved value is compared with PEFT's)
        with pytest.warns(
            UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"
        ):
            model = jpeft.get_peft_model(pair.flax_model, config)
        assert model.peft_config["default"].fan_in_fan_out is True
    else:
        model = jpeft.get_peft_model(pair.flax_model, config)
    parity.perturb_jpeft_adapter(model)
    return model


def _save_jpeft(model, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the save_embedding_layers notice; the keys are checked instead
        model.save_pretrained(folder)


def _params(test: str):
    """``CASES`` with this test's expected failures (``XFAIL[test]``) marked strict."""
    out = []
    for param in CASES:
        reason = XFAIL.get(test, {}).get(param.id)
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(*param.values, id=param.id, marks=marks))
    return out


ARGS = ("arch", "lora_kwargs", "tied_embedding")


@pytest.mark.parametrize(ARGS, _params("torch_to_jpeft"))
def test_torch_to_jpeft(arch, lora_kwargs, tied_embedding, tiny, tmp_path):
    """(a) a torch PEFT adapter (perturbed, saved by peft) loaded by jpeft gives torch's logits."""
    pair = tiny(arch)
    inputs = pair.inputs()
    ref = parity.torch_peft_save(pair, lora_kwargs, tmp_path)
    assert parity.max_diff(ref, parity.jax_logits(pair.flax_model, inputs)) > _MIN_ADAPTER_EFFECT, (
        "adapter is a no-op"
    )
    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    parity.assert_close(parity.jax_logits(loaded, inputs), ref, "torch PEFT adapter loaded by jpeft")


@pytest.mark.parametrize(ARGS, _params("jpeft_to_torch"))
def test_jpeft_to_torch(arch, lora_kwargs, tied_embedding, tiny, tmp_path):
    """(b) a jpeft adapter (perturbed, saved by jpeft) loaded by torch PEFT gives jpeft's logits."""
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_adapter(pair, lora_kwargs)
    got = parity.jax_logits(mine, inputs)
    assert parity.max_diff(got, parity.jax_logits(pair.flax_model, inputs)) > _MIN_ADAPTER_EFFECT, (
        "adapter is a no-op"
    )
    _save_jpeft(mine, tmp_path)
    theirs = parity.torch_peft_load(pair, tmp_path)
    parity.assert_close(parity.torch_logits(theirs, inputs), got, "jpeft adapter loaded by torch PEFT")


@pytest.mark.parametrize(ARGS, _params("checkpoint_format"))
def test_jpeft_checkpoint_format(arch, lora_kwargs, tied_embedding, tiny, tmp_path):
    """(b) jpeft writes the safetensors keys/shapes and config keys torch PEFT writes for the same config."""
    pair = tiny(arch)
    torch_dir, jax_dir = tmp_path / "torch", tmp_path / "jax"
    parity.torch_peft_save(pair, lora_kwargs, torch_dir)
    _save_jpeft(_jpeft_adapter(pair, lora_kwargs), jax_dir)

    _assert_same_config(_saved_config(jax_dir), _saved_config(torch_dir))
    jax_shapes, torch_shapes = _saved_shapes(jax_dir), _saved_shapes(torch_dir)
    assert jax_shapes == torch_shapes, (
        f"safetensors: only jpeft {sorted(set(jax_shapes) - set(torch_shapes))}, "
        f"only peft {sorted(set(torch_shapes) - set(jax_shapes))}, "
        f"shape differs {sorted(k for k in set(jax_shapes) & set(torch_shapes) if jax_shapes[k] != torch_shapes[k])}"
    )


@pytest.mark.parametrize(ARGS, _params("merge"))
def test_jpeft_merge(arch, lora_kwargs, tied_embedding, tiny):
    """(b) ``merge_and_unload()`` gives a plain Flax model with the unmerged adapter's logits."""
    if tied_embedding:
        # GPT-2's wte is also the output head (lm_head reuses it). Unmerged, the LoRA delta
        # applies to the token lookup only; merging writes it into the shared matrix, so the
        # head changes too (PEFT warns about tied embeddings for the same reason). The two are
        # different functions by design, so there is nothing to compare.
        pytest.skip("adapted embedding is tied to the output head; merging changes the head too")
    pair = tiny(arch)
    inputs = pair.inputs()
    mine = _jpeft_adapter(pair, lora_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = mine.merge_and_unload()
    assert not isinstance(merged, jpeft.PeftModel)
    parity.assert_close(
        parity.jax_logits(merged, inputs), parity.jax_logits(mine, inputs), "merged vs unmerged"
    )
    # Nothing here is tied to an output head, so a warning that merging changes the head
    # (and the logits) would be false.
    tied_warnings = [str(w.message) for w in caught if "tied" in str(w.message).lower()]
    assert not tied_warnings, tied_warnings
