"""P-tuning against torch PEFT: the MLP/LSTM encoders with copied weights, checkpoints both ways."""

from __future__ import annotations

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.prompt_learning import PromptLearningPeftModel
from jpeft.tuners import p_tuning
from jpeft.tuners.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from tests import parity
from tests.tuners.test_prompt_tuning import (
    ARCHS,
    NVT,
    TASKS,
    jpeft_save_and_torch_load,
    saved,
    torch_printout,
    torch_save,
)


def _configs(arch: str, kind: str, **extra) -> tuple[PromptEncoderConfig, object]:
    import peft

    kwargs = {
        "task_type": TASKS[arch],
        "num_virtual_tokens": NVT,
        "encoder_reparameterization_type": kind,
        **extra,
    }
    return PromptEncoderConfig(**kwargs), peft.PromptEncoderConfig(**kwargs)


def _torch_encoder(
    kind: str, *, token_dim: int, hidden: int, layers: int = 2, dropout: float = 0.0, rows: int = 5
):
    """torch PEFT's ``PromptEncoder`` with random (torch default) weights, and its jpeft twin's plan."""
    import peft
    import torch
    from peft.tuners.p_tuning.model import PromptEncoder

    config = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=rows,
        token_dim=token_dim,
        num_transformer_submodules=1,
        num_attention_heads=4,
        num_layers=2,
        encoder_reparameterization_type=kind,
        encoder_hidden_size=hidden,
        encoder_num_layers=layers,
        encoder_dropout=dropout,
    )
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's LSTM warns about dropout with one layer
        encoder = PromptEncoder(config)
    with torch.no_grad():
        encoder.embedding.weight.normal_()
    plan = types.SimpleNamespace(config=types.SimpleNamespace(encoder_dropout=dropout))
    return encoder, plan


# --------------------------------------------------------------------------- configs


def test_config_fields_and_defaults_match_peft():
    import peft

    ours = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).to_dict()
    theirs = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).to_dict()
    assert set(ours) == set(theirs)
    for field in (
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout",
    ):
        assert ours[field] == theirs[field], field
    assert ours["peft_type"] == "P_TUNING"
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type="LSTM"
    )
    assert config.encoder_reparameterization_type is PromptEncoderReparameterizationType.LSTM
    assert jpeft.config_from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"encoder_reparameterization_type": "GRU"}, "Please use one of MLP \\(recommended\\) or LSTM"),
        ({"encoder_num_layers": 0}, "`encoder_num_layers` must be a positive int"),
        ({"encoder_dropout": 1.0}, "`encoder_dropout` must be in \\[0, 1\\)"),
        ({"encoder_hidden_size": 0}, "`encoder_hidden_size` must be a positive int"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(jpeft.ConfigError, match=match):
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **kwargs)


def test_mlp_with_other_layer_count_warns_as_peft(tiny):
    pair = tiny("gpt2")
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_num_layers=3)
    with pytest.warns(UserWarning, match="for MLP, the argument `encoder_num_layers` is ignored"):
        peft_model = jpeft.get_peft_model(pair.flax_model, config)
    assert sorted(peft_model.adapters["default"]["prompt"]["mlp_head"]) == ["0", "2", "4"]
    lstm = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=2,
        encoder_num_layers=3,
        encoder_reparameterization_type="LSTM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model = jpeft.get_peft_model(pair.flax_model, lstm)
    assert sorted(peft_model.adapters["default"]["prompt"]["lstm_head"]) == [
        "l0",
        "l0_reverse",
        "l1",
        "l1_reverse",
        "l2",
        "l2_reverse",
    ]


# --------------------------------------------------------------------------- the encoder itself


@pytest.mark.parametrize(
    "kind, hidden, layers",
    [("MLP", 32, 2), ("MLP", 24, 2), ("LSTM", 32, 2), ("LSTM", 24, 3), ("LSTM", 16, 1)],
)
def test_encoder_equals_torch_prompt_encoder(kind, hidden, layers):
    import torch

    encoder, plan = _torch_encoder(kind, token_dim=32, hidden=hidden, layers=layers)
    tree = p_tuning.encoder_from_torch(encoder.state_dict())
    with torch.no_grad():
        want = encoder(torch.arange(5)[None])[0].numpy()
    got = p_tuning.prompt_embeddings(plan, {"prompt": tree}, train=False)
    parity.assert_close(got, want, f"{kind} encoder (hidden {hidden}, {layers} layers)")
    jitted = jax.jit(lambda t: p_tuning.prompt_embeddings(plan, {"prompt": t}))(tree)
    parity.assert_close(jitted, want, f"jitted {kind} encoder")


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_init_has_torchs_layout_and_ranges(tiny, kind):
    """jpeft's fresh encoder is torch's, param for param (shapes via encoder_from_torch, init bounds)."""
    pair = tiny("gpt2")
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=NVT,
        encoder_reparameterization_type=kind,
        encoder_hidden_size=24,
    )
    ours = jpeft.get_peft_model(pair.flax_model, config).adapters["default"]["prompt"]
    encoder, _ = _torch_encoder(kind, token_dim=32, hidden=24, rows=NVT)
    theirs = p_tuning.encoder_from_torch(encoder.state_dict())
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert jax.tree.map(np.shape, ours) == jax.tree.map(np.shape, theirs)
    if kind == "LSTM":
        bound = 1 / np.sqrt(24)
        for leaf in jax.tree.leaves(ours["lstm_head"]):
            assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.5 * bound
    first = ours["mlp_head"]["0"]["kernel"]
    assert np.abs(first).max() <= 1 / np.sqrt(first.shape[0])


def test_lstm_dropout_applies_between_layers_in_training_only():
    encoder, plan = _torch_encoder("LSTM", token_dim=32, hidden=16, layers=2, dropout=0.5)
    adapter = {"prompt": p_tuning.encoder_from_torch(encoder.state_dict())}
    evaluation = p_tuning.prompt_embeddings(plan, adapter, train=False)
    first = p_tuning.prompt_embeddings(plan, adapter, train=True, key=jax.random.key(1))
    again = p_tuning.prompt_embeddings(plan, adapter, train=True, key=jax.random.key(1))
    other = p_tuning.prompt_embeddings(plan, adapter, train=True, key=jax.random.key(2))
    assert parity.max_diff(first, evaluation) > 1e-3
    assert parity.max_diff(first, again) == 0.0 and parity.max_diff(first, other) > 1e-3
    with pytest.raises(ValueError, match="`encoder_dropout` > 0 in training needs a random key"):
        p_tuning.prompt_embeddings(plan, adapter, train=True, key=None)
    one_layer, plan = _torch_encoder("LSTM", token_dim=32, hidden=16, layers=1, dropout=0.5)
    adapter = {"prompt": p_tuning.encoder_from_torch(one_layer.state_dict())}
    parity.assert_close(  # torch applies no dropout after the last layer
        p_tuning.prompt_embeddings(plan, adapter, train=True, key=None),
        p_tuning.prompt_embeddings(plan, adapter, train=False),
        "one-layer LSTM in training",
        atol=0.0,
    )


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_encoder_from_torch_keeps_its_own_copy(kind, monkeypatch):
    """Training the torch encoder on (in-place updates) leaves the converted tree as it was.

    Some jax versions alias a contiguous NumPy buffer on the CPU instead of copying it
    (jax-ml/jax#37830); the jax here copies, so ``jnp.asarray`` is made to alias as those do.
    """
    import torch

    copying = jnp.asarray

    def aliasing(x, *args, **kwargs):
        if isinstance(x, np.ndarray) and x.flags.c_contiguous and not args and not kwargs:
            return jnp.from_dlpack(x)
        return copying(x, *args, **kwargs)

    monkeypatch.setattr(jnp, "asarray", aliasing)
    probe = torch.zeros(64).numpy()  # torch's buffers are aligned as XLA needs to alias them
    view = jnp.asarray(probe)
    probe[0] = 1.0
    assert float(view[0]) == 1.0  # the stand-in does alias

    encoder, _ = _torch_encoder(kind, token_dim=32, hidden=24, layers=2)
    tree = p_tuning.encoder_from_torch(encoder.state_dict())
    before = jax.tree.map(lambda x: np.array(x, copy=True), tree)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(1.0)
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_encoder_from_torch_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unexpected key 'transform.0.weight'"):
        p_tuning.encoder_from_torch({"transform.0.weight": np.zeros((2, 2))})


# --------------------------------------------------------------------------- checkpoints, both directions


# loading is the same for both encoders (only their output table is saved): MLP runs as slow
@pytest.mark.parametrize("kind", [pytest.param("MLP", marks=pytest.mark.slow), "LSTM"])
@pytest.mark.parametrize("arch", ARCHS)
def test_torch_checkpoint_loads_in_jpeft_with_equal_outputs(tiny, tmp_path, arch, kind):
    pair = tiny(arch)
    _, torch_config = _configs(arch, kind)
    want = torch_save(pair, torch_config, tmp_path)
    peft_model = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path)
    assert isinstance(peft_model, PromptLearningPeftModel)
    assert set(peft_model.adapters["default"]["prompt"]) == {
        "embedding"
    }  # the encoder is not rebuilt, as PEFT
    parity.assert_close(parity.jax_logits(peft_model, pair.inputs()), want, f"torch -> jpeft {arch} {kind}")


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("arch", ARCHS)
def test_jpeft_checkpoint_loads_in_torch_and_matches_peft_layout(tiny, tmp_path, arch, kind):
    pair = tiny(arch)
    config, torch_config = _configs(arch, kind, encoder_hidden_size=24)
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    parity.perturb_jpeft_adapter(peft_model)
    got, want = jpeft_save_and_torch_load(pair, peft_model, tmp_path / "jpeft")
    parity.assert_close(got, want, f"jpeft -> torch {arch} {kind}")
    torch_save(pair, torch_config, tmp_path / "torch", perturb=False)
    assert saved(tmp_path / "jpeft") == saved(tmp_path / "torch")


def test_torch_training_state_continues_in_jpeft(tiny):
    """A torch P-tuning model's encoder, moved with encoder_from_torch, gives torch's logits in training mode."""
    import peft
    import torch

    pair = tiny("llama")
    config, torch_config = _configs("llama", "LSTM")
    torch.manual_seed(0)
    torch_model = peft.get_peft_model(pair.torch_model(), torch_config).eval()
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    params = peft_model.params
    params["adapters"]["default"]["prompt"] = p_tuning.encoder_from_torch(
        torch_model.prompt_encoder["default"].state_dict()
    )
    peft_model.params = params
    want = parity.torch_logits(torch_model, pair.inputs())
    parity.assert_close(parity.jax_logits(peft_model, pair.inputs()), want, "torch encoder in jpeft")


@pytest.mark.parametrize(
    "arch, kind", [("gpt2", "MLP"), ("llama", "LSTM"), ("bert", "LSTM"), ("bart", "MLP")]
)
def test_print_trainable_parameters_equals_peft(tiny, arch, kind):
    pair = tiny(arch)
    config, torch_config = _configs(arch, kind, encoder_hidden_size=24)
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    assert parity.captured(peft_model.print_trainable_parameters) == torch_printout(pair, torch_config)


def test_generate_equals_peft(tiny, tmp_path):
    import torch

    pair = tiny("gpt2")
    config, _ = _configs("gpt2", "LSTM")
    peft_model = jpeft.get_peft_model(pair.flax_model, config)
    parity.perturb_jpeft_adapter(peft_model, scale=0.5)
    peft_model.save_pretrained(tmp_path)
    torch_model = parity.torch_peft_load(pair, tmp_path)
    inputs = pair.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = peft_model.generate(
            inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6
        )
        with torch.no_grad():
            want = torch_model.generate(**parity.torch_inputs(inputs), do_sample=False, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(got.sequences), want.numpy())
