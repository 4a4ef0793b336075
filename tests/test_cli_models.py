"""The ``jpeft`` command on jpeft's own family models: a transformers folder trains, checks and exports."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from jpeft import cli
from tests.models import families as fam
from tests.test_cli import SHORT, number_after, run_main


def _char_tokenizer(folder) -> None:
    """A character-level tokenizer of ``vocab`` 96 (printable ASCII), saved as transformers' fast tokenizer."""
    import tokenizers
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(c): c - 30 for c in range(32, 126)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-family") / "qwen3"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fam.torch_model("qwen3").save_pretrained(folder)
    _char_tokenizer(folder)
    return folder


@pytest.mark.slow
def test_train_and_export_merged_on_a_family_folder(family_folder, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_main(
        [*SHORT, "--model", str(family_folder), "--steps", "3", "--eval-every", "3", "--new-tokens", "4"]
        + ["--target-modules", "q_proj,v_proj,down_proj", "--output-dir", str(out)]
    )
    assert code == 0, stdout + stderr
    assert re.search(r"^sample: 'Ada finds the' -> ", stdout, re.M), stdout
    assert number_after(r"torch PEFT loaded the adapter: max \|logits diff\| vs jpeft =", stdout) <= 1e-4

    merged = tmp_path / "merged"
    code, stdout, stderr = run_main(
        ["export", str(out / "adapter"), "--out", str(merged), "--base", str(family_folder), "--merged"]
    )
    assert code == 0, stdout + stderr
    assert number_after(r"transformers loaded the merged model: max \|logits diff\| vs jpeft =", stdout) <= 1e-4
    import transformers

    assert type(transformers.AutoModelForCausalLM.from_pretrained(merged)).__name__ == "Qwen3ForCausalLM"


def test_builtin_is_a_tiny_llama_of_jpeft_models():
    import jpeft

    model, tokenizer = cli.load_causal_lm(cli.BUILTIN)
    assert isinstance(model, jpeft.models.CausalLM) and model.config.model_type == "llama"
    assert model.config.vocab_size == 256 and max(tokenizer.encode("Ada\u00e9")) < 256
    ids = np.asarray([tokenizer.encode("Ada finds the")], np.int32)
    assert model(ids).logits.shape == (1, ids.shape[1], 256)


def test_offline_hub_model_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = cli.main([*SHORT, "--model", "some-org/not-cached", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("jpeft: error: ") and "Traceback" not in err, err
    assert "HF_HUB_OFFLINE" in err, err
