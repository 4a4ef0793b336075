"""Adapter configs: PEFT's field set, the JSON round trip, and clear errors for what jpeft cannot honour."""

from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jpeft
from jpeft.config import PEFT_FORMAT_VERSION

peft = pytest.importorskip("peft")


def _peft_lora(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.LoraConfig(**kwargs)


def _normalise(d: dict) -> dict:
    """PEFT keeps list targets as sets; compare them as sets."""
    out = dict(d)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(out.get(key), (list, set, tuple)):
            out[key] = set(out[key])
    return out


# ---------------------------------------------------------------------------------------------------- field set


def test_lora_config_keys_equal_peft():
    ours = jpeft.LoraConfig().to_dict()
    theirs = _peft_lora().to_dict()
    assert set(ours) == set(theirs)


def test_lora_config_defaults_equal_peft():
    ours = jpeft.LoraConfig().to_dict()
    theirs = _peft_lora().to_dict()
    for key in ours:
        if key == "peft_version":
            continue
        value = theirs[key]
        value = value.value if hasattr(value, "value") else value
        assert ours[key] == value, key
    assert ours["peft_type"] == "LORA"
    assert ours["peft_version"] == PEFT_FORMAT_VERSION


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        dict(r=2, target_modules=r".*\.c_attn", lora_dropout=0.1, use_rslora=True, bias="lora_only"),
        dict(
            target_modules=["c_attn"],
            layers_to_transform=[0, 1],
            layers_pattern="h",
            modules_to_save=["lm_head"],
        ),
        dict(
            target_modules=["query"],
            exclude_modules=["x"],
            rank_pattern={"query": 2},
            alpha_pattern={"value": 4},
        ),
        dict(target_modules=["q"], use_dora=True, init_lora_weights="gaussian", task_type="SEQ_2_SEQ_LM"),
    ],
)
def test_to_dict_values_equal_peft(kwargs):
    ours = _normalise(jpeft.LoraConfig(**kwargs).to_dict())
    theirs = _normalise(_peft_lora(**kwargs).to_dict())
    theirs["peft_type"] = theirs["peft_type"].value
    if theirs["task_type"] is not None:
        theirs["task_type"] = getattr(theirs["task_type"], "value", theirs["task_type"])
    theirs["peft_version"] = PEFT_FORMAT_VERSION
    assert ours == theirs


# ---------------------------------------------------------------------------------------------------- JSON round trip

config_kwargs = st.fixed_dictionaries(
    {},
    optional={
        "r": st.integers(1, 64),
        "lora_alpha": st.sampled_from([1, 8, 16.0, 0.5]),
        "lora_dropout": st.sampled_from([0.0, 0.05, 0.5]),
        "bias": st.sampled_from(["none", "all", "lora_only"]),
        "use_rslora": st.booleans(),
        "modules_to_save": st.none()
        | st.lists(st.sampled_from(["lm_head", "classifier"]), max_size=2, unique=True),
        "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "pissa_niter_4", "olora"]),
        "rank_pattern": st.dictionaries(
            st.sampled_from(["q_proj", r"layers\.0\..*"]), st.integers(1, 8), max_size=2
        ),
        "alpha_pattern": st.dictionaries(st.sampled_from(["v_proj"]), st.sampled_from([2, 4.5]), max_size=1),
        "use_dora": st.booleans(),
        "task_type": st.sampled_from([None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS"]),
        "base_model_name_or_path": st.sampled_from([None, "gpt2", "org/model"]),
        "revision": st.sampled_from([None, "main"]),
        "inference_mode": st.booleans(),
        "exclude_modules": st.none() | st.sampled_from([r".*lm_head", ["c_proj"]]),
        "fan_in_fan_out": st.booleans(),
        "qalora_group_size": st.integers(1, 64),
    },
).flatmap(
    lambda kw: st.sampled_from(
        [
            dict(kw, target_modules=["q_proj", "v_proj"]),
            dict(kw, target_modules=r".*\.(q|v)_proj"),
            dict(kw, target_modules=["c_attn"], layers_to_transform=1),
            dict(kw, target_modules=["c_attn"], layers_to_transform=[0, 2], layers_pattern=["h", "layers"]),
            dict(kw, target_modules=None),
        ]
    )
)


@settings(derandomize=True, max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(config_kwargs)
def test_json_round_trip(kwargs):
    config = jpeft.LoraConfig(**kwargs)
    text = config.to_json_string()
    data = json.loads(text)
    assert data["peft_type"] == "LORA"
    # PEFT's layout: sorted keys, indent 2
    assert text == json.dumps(data, indent=2, sort_keys=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file gives no warning
        back = jpeft.config_from_dict(data)
    assert isinstance(back, jpeft.LoraConfig)
    assert back.to_dict() == config.to_dict()
    assert back == config.replace(peft_version=PEFT_FORMAT_VERSION)


def test_peft_written_config_reads_back_identically(tmp_path):
    kwargs = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=[0], layers_pattern="layers",
                  task_type="CAUSAL_LM", rank_pattern={"q_proj": 2})  # fmt: skip
    _peft_lora(**kwargs).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = jpeft.config_from_dict(data)
    assert _normalise(ours.to_dict()) == _normalise(data)
    assert ours.r == 4 and ours.task_type == jpeft.TaskType.CAUSAL_LM


def test_jpeft_written_config_reads_in_peft(tmp_path):
    config = jpeft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn"], task_type="CAUSAL_LM", use_rslora=True
    )
    (tmp_path / "adapter_config.json").write_text(config.to_json_string())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, peft.LoraConfig)
    assert theirs.r == 4 and theirs.lora_alpha == 16 and theirs.use_rslora
    assert set(theirs.target_modules) == {"c_attn"}


def test_minimal_config_takes_defaults():
    config = jpeft.config_from_dict(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}
    )
    assert config == jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])


def test_unknown_keys_warn_and_are_dropped():
    data = jpeft.LoraConfig(r=4).to_dict()
    data["some_future_option"] = 3
    data["another"] = "x"
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['another', 'some_future_option'\]"):
        config = jpeft.config_from_dict(data)
    assert config.r == 4
    assert "some_future_option" not in config.to_dict()
    assert not hasattr(config, "some_future_option")


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("layer_replication", [[0, 2], [1, 3]]),
        ("use_qalora", True),
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("trainable_token_indices", [1, 2]),
        ("target_parameters", ["experts.gate_up_proj"]),
        ("eva_config", {"rho": 2.0}),
        ("alora_invocation_tokens", [1, 2, 3]),
        ("ensure_weight_tying", True),
    ],
)
def test_unsupported_fields_at_non_default_raise(field, value):
    with pytest.raises(jpeft.ConfigError, match=field):
        jpeft.LoraConfig(**{field: value})
    # the same from a file
    data = jpeft.LoraConfig().to_dict()
    data[field] = value
    with pytest.raises(jpeft.ConfigError, match=field):
        jpeft.config_from_dict(data)


def test_unsupported_fields_at_default_values_are_accepted():
    # PEFT writes these defaults into every adapter_config.json
    data = _peft_lora(target_modules=["q"]).to_dict()
    data["peft_type"] = "LORA"
    data["target_modules"] = ["q"]
    config = jpeft.config_from_dict(data)
    assert config.loftq_config == {} and config.layer_replication is None and config.use_qalora is False


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(layers_pattern="h"), ["layers_pattern", "layers_to_transform"]),
        (
            dict(layers_pattern=["h", "layers"], target_modules=["c_attn"]),
            ["layers_pattern", "layers_to_transform"],
        ),
        (
            dict(target_modules=r".*c_attn", layers_to_transform=[0]),
            ["layers_to_transform", "target_modules"],
        ),
        (
            dict(target_modules=r".*c_attn", layers_to_transform=0, layers_pattern="h"),
            ["layers_to_transform", "target_modules"],
        ),
        (dict(target_modules=r".*c_attn", layers_pattern="h"), ["layers_pattern", "target_modules"]),
        (dict(use_dora=True, lora_bias=True), ["use_dora", "lora_bias"]),
    ],
)
def test_conflicting_options_name_both(kwargs, names):
    with pytest.raises(jpeft.ConfigError) as info:
        jpeft.LoraConfig(**kwargs)
    for name in names:
        assert name in str(info.value)
    # PEFT refuses these combinations too
    with pytest.raises(ValueError):
        _peft_lora(**kwargs)


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_lora_bias_requires_plain_init(init):
    with pytest.raises(ValueError):
        _peft_lora(lora_bias=True, init_lora_weights=init)
    with pytest.raises(jpeft.ConfigError) as info:
        jpeft.LoraConfig(lora_bias=True, init_lora_weights=init)
    assert "lora_bias" in str(info.value) and "init_lora_weights" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(bias="some"), "bias"),
        (dict(bias="lora"), "'lora'"),
        (dict(r=0), "`r`"),
        (dict(r=-3), "-3"),
        (dict(r=2.5), "`r`"),
        (dict(init_lora_weights="eva"), "eva"),
        (dict(init_lora_weights="loftq"), "loftq"),
        (dict(init_lora_weights="corda"), "corda"),
        (dict(init_lora_weights="orthogonal"), "orthogonal"),
        (dict(init_lora_weights="pissa_niter_"), "pissa_niter_"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(rank_pattern={"q_proj(": 2}), "rank_pattern"),
    ],
)
def test_invalid_values_raise_config_error(kwargs, needle):
    with pytest.raises(jpeft.ConfigError) as info:
        jpeft.LoraConfig(**kwargs)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_configs_are_frozen():
    config = jpeft.LoraConfig(r=4)
    with pytest.raises(AttributeError):
        config.r = 8  # type: ignore[misc]
    assert config.replace(r=8).r == 8 and config.r == 4
    with pytest.raises(jpeft.ConfigError):
        config.replace(r=0)


# ---------------------------------------------------------------------------------------------------- peft_type / task_type


def test_missing_peft_type_raises():
    data = jpeft.LoraConfig().to_dict()
    del data["peft_type"]
    with pytest.raises(jpeft.ConfigError, match="peft_type"):
        jpeft.config_from_dict(data)


@pytest.mark.parametrize("value", ["lora", "FOO", "Lora", "", None])
def test_unknown_peft_type_raises(value):
    data = jpeft.LoraConfig().to_dict()
    data["peft_type"] = value
    with pytest.raises(jpeft.ConfigError) as info:
        jpeft.config_from_dict(data)
    assert repr(value) in str(info.value)
    assert "LORA" in str(info.value)


def test_unimplemented_peft_type_raises():
    with pytest.raises(jpeft.ConfigError, match="LOKR"):
        jpeft.config_from_dict({"peft_type": "LOKR", "r": 4})
    config = jpeft.config_from_dict(
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "task_type": "CAUSAL_LM"}
    )
    assert isinstance(config, jpeft.PrefixTuningConfig) and config.num_virtual_tokens == 4


def test_peft_type_mismatch_in_from_dict():
    with pytest.raises(jpeft.ConfigError, match="ADALORA"):
        jpeft.LoraConfig.from_dict({"peft_type": "ADALORA"})


@pytest.mark.parametrize("value", ["causal_lm", "FOO", "CAUSAL-LM"])
def test_invalid_task_type_raises(value):
    with pytest.raises(jpeft.ConfigError, match="Invalid task type"):
        jpeft.LoraConfig(task_type=value)
    data = jpeft.LoraConfig().to_dict()
    data["task_type"] = value
    with pytest.raises(jpeft.ConfigError, match=repr(value)):
        jpeft.config_from_dict(data)


def test_task_type_accepts_string_and_enum():
    assert jpeft.LoraConfig(task_type="SEQ_CLS").task_type is jpeft.TaskType.SEQ_CLS
    assert jpeft.LoraConfig(task_type=jpeft.TaskType.CAUSAL_LM).to_dict()["task_type"] == "CAUSAL_LM"
