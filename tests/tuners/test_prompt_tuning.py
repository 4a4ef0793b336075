"""Prompt tuning against torch PEFT: configs, the three inits, checkpoints both ways, generate.

Every architecture/task pair of the tiny models runs: GPT-2 and Llama (CAUSAL_LM), BERT
(SEQ_CLS, padded batch, classifier in ``modules_to_save``) and BART (SEQ_2_SEQ_LM).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import jpeft
from jpeft.prompt_learning import PromptLearningPeftModel
from jpeft.tuners import prompt_tuning
from jpeft.tuners.prompt_tuning import PromptTuningConfig, PromptTuningInit
from tests import parity

TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS", "bart": "SEQ_2_SEQ_LM"}
ARCHS = tuple(TASKS)
NVT = 3
INIT_TEXT = "w5 w7 w9"  # 3 tokens: repeated for NVT * 2 (seq2seq), truncated for fewer rows


# --------------------------------------------------------------------------- shared helpers (also used by P-tuning)


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory) -> str:
    """A tiny word-level tokenizer (``w1`` .. ``w99``) saved offline; AutoTokenizer loads it in both frameworks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


def torch_save(
    pair: Any, torch_config: Any, folder: Path, *, seed: int = 1, perturb: bool = True
) -> np.ndarray:
    """torch PEFT model for ``torch_config``, prompt params made non-trivial, saved; returns its logits."""
    import peft
    import torch

    torch.manual_seed(seed)
    model = peft.get_peft_model(pair.torch_model(), torch_config)
    if perturb:
        parity.perturb_torch_trainable(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return parity.torch_logits(model, pair.inputs())


def jpeft_save_and_torch_load(pair: Any, peft_model: Any, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Saves ``peft_model``, loads the folder in torch PEFT; returns ``(jpeft logits, torch logits)``."""
    got = parity.jax_logits(peft_model, pair.inputs())
    peft_model.save_pretrained(folder)
    torch_model = parity.torch_peft_load(pair, folder)
    return got, parity.torch_logits(torch_model, pair.inputs())


def saved(folder: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """``({key: shape}, adapter_config.json)`` of a save folder.

    ``base_model_name_or_path`` is left out: torch records the base model's folder, while the
    tiny Flax models (loaded ``from_pt``) carry no name.
    """
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path")
    return {k: tuple(v.shape) for k, v in tensors.items()}, config


def torch_printout(pair: Any, torch_config: Any) -> str:
    import peft
    import torch

    torch.manual_seed(0)
    model = peft.get_peft_model(pair.torch_model(), torch_config)
    return parity.captured(model.print_trainable_parameters)


# --------------------------------------------------------------------------- configs


def _configs(arch: str, init: str, tokenizer_folder: str) -> tuple[PromptTuningConfig, Any]:
    """The same prompt-tuning config in jpeft and in torch PEFT."""
    import peft

    kwargs: dict[str, Any] = {"task_type": TASKS[arch], "num_virtual_tokens": NVT, "prompt_tuning_init": init}
    if init == "TEXT":
        kwargs.update(prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=tokenizer_folder)
    return PromptTuningConfig(**kwargs), peft.PromptTuningConfig(**kwargs)


def test_config_fields_and_defaults_match_peft():
    import peft

    ours = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).to_dict()
    theirs = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).to_dict()
    assert set(ours) == set(theirs)
    for field in (
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
    ):
        assert ours[field] == theirs[field], field
    assert ours["peft_type"] == "PROMPT_TUNING"
    assert (
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).prompt_tuning_init
        is PromptTuningInit.RANDOM
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "w1"},
            "tokenizer_name_or_path can't be None",
        ),
        (
            {"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "tok"},
            "prompt_tuning_init_text can't be None",
        ),
        ({"tokenizer_kwargs": {"use_fast": True}}, "tokenizer_kwargs only valid"),
        ({"prompt_tuning_init": "ZEROS"}, "`prompt_tuning_init` must be one of TEXT, SAMPLE_VOCAB, RANDOM"),
    ],
)
def test_config_rejects_bad_init_arguments(kwargs, match):
    with pytest.raises(jpeft.ConfigError, match=match):
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **kwargs)


def test_config_needs_task_type_and_virtual_tokens():
    with pytest.raises(jpeft.ConfigError, match="needs a `task_type`"):
        PromptTuningConfig(num_virtual_tokens=4)
    with pytest.raises(jpeft.ConfigError, match="`num_virtual_tokens` >= 1"):
        PromptTuningConfig(task_type="CAUSAL_LM")


def test_config_round_trips_through_json():
    config = PromptTuningConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w1 w2",
        tokenizer_name_or_path="some/tokenizer",
        tokenizer_kwargs={"revision": "main"},
    )
    again = jpeft.config_from_dict(json.loads(config.to_json_string()))
    assert isinstance(again, PromptTuningConfig) and again.to_dict() == config.to_dict()
    assert again.prompt_tuning_init is PromptTuningInit.TEXT


# --------------------------------------------------------------------------- inits


def test_random_init_is_standard_normal_and_keyed(tiny):
    pair = tiny("gpt2")
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=64)
    table = np.asarray(
        jpeft.get_peft_model(pair.flax_model, config).adapters["default"]["prompt"]["embedding"]
    )
    assert table.shape == (64, 32) and table.dtype == np.float32
    assert abs(table.mean()) < 0.05 and abs(table.std() - 1.0) < 0.05  # 2048 samples of N(0, 1)
    other = jpeft.get_peft_model(pair.flax_model, config, key=jax.random.key(7)).adapters["default"]
    assert parity.max_diff(other["prompt"]["embedding"], table) > 0.5


def test_sample_vocab_init_takes_rows_of_the_word_embedding(tiny):
    pair = tiny("llama")
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=16, prompt_tuning_init="SAMPLE_VOCAB"
    )
    table = np.asarray(
        jpeft.get_peft_model(pair.flax_model, config).adapters["default"]["prompt"]["embedding"]
    )
    vocab = np.asarray(pair.flax_model.params["model"]["embed_tokens"]["embedding"])
    distances = np.abs(table[:, None, :] - vocab[None, :, :]).max(-1)  # (rows, vocab)
    assert (distances.min(-1) == 0).all()  # every row is exactly some token's embedding
    assert len(set(distances.argmin(-1).tolist())) > 1


@pytest.mark.parametrize("arch, nvt", [("gpt2", 2), ("gpt2", 7), ("bart", 4)])
def test_text_init_equals_peft(tiny, tokenizer_folder, arch, nvt):
    """Truncated (2 < 3 tokens), repeated (7 rows), seq2seq (2 * 4 rows): the same rows as PEFT's init."""
    import peft
    import torch

    pair = tiny(arch)
    kwargs = dict(
        task_type=TASKS[arch],
        num_virtual_tokens=nvt,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=tokenizer_folder,
    )
    torch_model = peft.get_peft_model(pair.torch_model(), peft.PromptTuningConfig(**kwargs))
    want = torch_model.prompt_encoder["default"].embedding.weight.detach().numpy()
    got = jpeft.get_peft_model(pair.flax_model, PromptTuningConfig(**kwargs)).adapters["default"]["prompt"]
    assert got["embedding"].shape == want.shape
    parity.assert_close(got["embedding"], want, f"{arch} TEXT init, {nvt} virtual tokens", atol=0.0)
    with torch.no_grad():
        ids = torch.tensor([5, 7, 9] * 3)[: want.shape[0]]
        np.testing.assert_array_equal(want, torch_model.word_embeddings(ids).numpy())


def test_text_init_drops_trust_remote_code(tiny, tokenizer_folder):
    pair = tiny("gpt2")
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=tokenizer_folder,
        tokenizer_kwargs={"trust_remote_code": True},
    )
    table = jpeft.get_peft_model(pair.flax_model, config).adapters["default"]["prompt"]["embedding"]
    wte = np.asarray(pair.flax_model.params["transformer"]["wte"]["embedding"])
    np.testing.assert_array_equal(np.asarray(table), wte[[5, 7, 9]])


def test_text_init_with_an_empty_text_is_a_clear_error(tiny, tokenizer_folder):
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="",
        tokenizer_name_or_path=tokenizer_folder,
    )
    with pytest.raises(jpeft.ConfigError, match="gives no tokens"):
        jpeft.get_peft_model(tiny("gpt2").flax_model, config)


# --------------------------------------------------------------------------- checkpoints, both directions


# The init only decides the starting rows (overwritten by the perturbation or the file): RANDOM runs by
# default, the other two are the same path with other config fields.
INITS = [
    "RANDOM",
    pytest.param("SAMPLE_VOCAB", marks=pytest.mark.slow),
    pytest.param("TEXT", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", ARCHS)
def test_torch_checkpoint_loads_in_jpeft_with_equal_outputs(tiny, tmp_path, tokenizer_folder, arch, init):
    pair = tiny(arch)
    _, torch_config = _configs(arch, init, tokenizer_folder)
    want = torch_save(pair, torch_config, tmp_path)
    peft_model = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    assert isinstance(peft_model, PromptLearningPeftModel)
    assert peft_model.peft_config["default"].inference_mode
    got = parity.jax_logits(peft_model, pair.inputs())
    if TASKS[arch] == "CAUSAL_LM":
        assert got.shape[1] == NVT + pair.inputs()["input_ids"].shape[1]  # PEFT's nvt + seq positions
    parity.assert_close(got, want, f"torch -> jpeft {arch} {init}")
    base = parity.jax_logits(pair.flax_model, pair.inputs())
    if TASKS[arch] == "CAUSAL_LM":
        got = got[:, NVT:]
    assert parity.max_diff(got, base) > 1e-3  # the prompts do change the outputs


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", ARCHS)
def test_jpeft_checkpoint_loads_in_torch_and_matches_peft_layout(
    tiny, tmp_path, tokenizer_folder, arch, init
):
    pair = tiny(arch)
    config, torch_config = _configs(arch, init, tokenizer_folder)
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    parity.perturb_jpeft_adapter(peft_model)
    got, want = jpeft_save_and_torch_load(pair, peft_model, tmp_path / "jpeft")
    parity.assert_close(got, want, f"jpeft -> torch {arch} {init}")
    torch_save(pair, torch_config, tmp_path / "torch", perturb=False)
    assert saved(tmp_path / "jpeft") == saved(tmp_path / "torch")


@pytest.mark.parametrize("arch", ARCHS)
def test_print_trainable_parameters_equals_peft(tiny, arch):
    pair = tiny(arch)
    config, torch_config = _configs(arch, "RANDOM", "")
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    assert parity.captured(peft_model.print_trainable_parameters) == torch_printout(pair, torch_config)


def test_saved_prompt_embeddings_are_the_table_in_fp32(tiny, tmp_path):
    pair = tiny("bart")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
    )
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == {"prompt_embeddings"}
    assert tensors["prompt_embeddings"].dtype == np.float32 and tensors["prompt_embeddings"].shape == (8, 32)
    np.testing.assert_array_equal(
        tensors["prompt_embeddings"], peft_model.adapters["default"]["prompt"]["embedding"]
    )


def test_loading_needs_no_tokenizer(tiny, tmp_path, tokenizer_folder):
    """A TEXT adapter loads without its tokenizer (the rows come from the file), as in PEFT."""
    pair = tiny("gpt2")
    config, _ = _configs("gpt2", "TEXT", tokenizer_folder)
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    parity.perturb_jpeft_adapter(peft_model)
    peft_model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["tokenizer_name_or_path"] = str(tmp_path / "no-such-tokenizer")
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    parity.assert_close(
        loaded(**pair.inputs()).logits, peft_model(**pair.inputs()).logits, "reloaded", atol=0.0
    )


# --------------------------------------------------------------------------- generate


GENERATE_KWARGS = {
    "gpt2": {"max_new_tokens": 5},
    "llama": {"max_new_tokens": 5},
    # the tiny random BART emits EOS at once; a minimum length makes the comparison say something
    "bart": {"max_length": 8, "min_length": 8},
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_greedy_generate_equals_peft(tiny, tmp_path, arch):
    import torch

    pair = tiny(arch)
    config = PromptTuningConfig(task_type=TASKS[arch], num_virtual_tokens=NVT)
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    parity.perturb_jpeft_adapter(peft_model, scale=1.0)
    peft_model.save_pretrained(tmp_path)
    torch_model = parity.torch_peft_load(pair, tmp_path)
    inputs = pair.inputs()
    kwargs = GENERATE_KWARGS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = np.asarray(
            peft_model.generate(
                inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs
            ).sequences
        )
        with torch.no_grad():
            want = torch_model.generate(
                **{k: v for k, v in parity.torch_inputs(inputs).items() if k != "decoder_input_ids"},
                do_sample=False,
                **kwargs,
            ).numpy()
    np.testing.assert_array_equal(got, want)
    if TASKS[arch] == "CAUSAL_LM":
        np.testing.assert_array_equal(got[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        assert got.shape[1] == inputs["input_ids"].shape[1] + 5


def test_generate_with_max_length_counts_the_callers_ids(tiny):
    pair = tiny("gpt2")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    ids = pair.inputs()["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model.generate(ids, max_length=ids.shape[1] + 3)
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + 3)


def test_module_functions_follow_the_protocol(tiny):
    pair = tiny("bert")
    peft_model = jpeft.get_peft_model(
        pair.flax_model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    )
    plan, adapter = peft_model.plan("default"), peft_model.adapters["default"]
    assert plan.layers == {} and plan.hooked == frozenset() and plan.bias_leaves == ()
    assert plan.modules_to_save == ("classifier",)
    assert plan.config.modules_to_save == ["classifier", "score", "classifier", "score"]  # PEFT's quirk
    assert plan.word_embeddings == "bert.embeddings.word_embeddings"
    entries = prompt_tuning.key_entries(plan, adapter, "auto")
    # the key table declares prompt_embeddings too (written from the encoder output, read into the table)
    assert sorted(e.file_key for e in entries) == [
        "base_model.classifier.bias",
        "base_model.classifier.weight",
        "prompt_embeddings",
    ]
    assert [e.file_key for e in entries if not e.save] == ["prompt_embeddings"]
    assert prompt_tuning.counted_in_total(plan, adapter) == 2 * 32 + 3 * 32 + 3
    batch = {"input_ids": np.ones((2, 5), np.int32), "labels": np.zeros((2,), np.int32)}
    assert prompt_tuning.loss_batch(plan, batch) is batch
