"""Target selection agrees with PEFT 0.21.2's own functions (the installed ``peft`` is the oracle)."""

from __future__ import annotations

import re
import types
import warnings

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jpeft
from jpeft.core import targets
from jpeft.core.modules import ModuleInfo
from jpeft.core.targets import (
    EXCLUDED,
    find_minimal_target_modules,
    get_pattern_key,
    match_module,
    modules_to_save_names,
    select_targets,
)

peft_tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
peft_other = pytest.importorskip("peft.utils.other")

FAST = settings(derandomize=True, max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------------------------------------------- strategies

# Segments chosen so that names collide on suffixes, substrings ("proj" inside "q_proj"), layer indexes
# (including multi-digit and nested MoE-style indexes) and layer-pattern words ("h", "layers", "layer").
SEGMENTS = [
    "model", "transformer", "encoder", "decoder", "layers", "layer", "h", "blocks",
    "0", "1", "2", "3", "10", "12",
    "self_attn", "attn", "mlp", "experts", "q_proj", "v_proj", "proj", "c_attn", "c_proj",
    "dense", "lm_head", "classifier", "score", "embed_tokens",
]  # fmt: skip

segment = st.sampled_from(SEGMENTS)
module_names = st.lists(segment, min_size=1, max_size=7).map(".".join)
name_lists = st.lists(module_names, min_size=1, max_size=10, unique=True)
suffix = st.lists(segment, min_size=1, max_size=3).map(".".join)

# Regexes PEFT users write for `target_modules` / `exclude_modules` strings (all compile).
REGEXES = [
    r".*q_proj",
    r".*\.(q|v)_proj",
    r".*layers\.1\..*",
    r".*\.\d+\.attn\.c_attn",
    r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
    r"q_proj",
    r".*proj",
    r"transformer\.h\.[01]\..*",
    r".*(dense|lm_head)",
    r"(?!.*mlp).*_proj",
    r".*",
    r"",
]
regex = st.sampled_from(REGEXES)


def _regex_or_escaped(draw, names):
    """A regex from the list, or the escaped full name of one generated module (so string targets hit)."""
    if names and draw(st.booleans()):
        return re.escape(draw(st.sampled_from(names)))
    return draw(regex)


def _suffixes_of(names):
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return sorted(out)


@st.composite
def names_and_config(draw):
    names = draw(name_lists)
    known = _suffixes_of(names)
    # list entries: real suffixes / full names of the generated modules, or arbitrary suffixes
    entry = st.sampled_from(known) | suffix
    kind = draw(st.sampled_from(["list", "list", "regex"]))
    if kind == "list":
        target_modules = draw(st.lists(entry, min_size=1, max_size=4, unique=True))
    else:
        target_modules = _regex_or_escaped(draw, names)

    exclude_kind = draw(st.sampled_from([None, None, "list", "regex"]))
    if exclude_kind == "list":
        exclude_modules = draw(st.lists(entry, min_size=0, max_size=3, unique=True))
    elif exclude_kind == "regex":
        exclude_modules = _regex_or_escaped(draw, names)
    else:
        exclude_modules = None

    modules_to_save = draw(
        st.none()
        | st.lists(st.sampled_from(["lm_head", "classifier", "score", "dense", "mlp", "1"]), max_size=2)
    )
    layers_to_transform = None
    layers_pattern = None
    if kind == "list":
        layers_to_transform = draw(
            st.none() | st.integers(0, 12) | st.lists(st.sampled_from([0, 1, 2, 3, 10, 12]), max_size=3)
        )
        if layers_to_transform is not None:
            layers_pattern = draw(
                st.none()
                | st.sampled_from(["layers", "h", "layer", "blocks", "experts", ""])
                | st.lists(st.sampled_from(["layers", "h", "layer", "experts"]), max_size=2)
            )
    config = dict(
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    return names, config


def peft_namespace(config: dict) -> types.SimpleNamespace:
    """What ``check_target_module_exists`` reads from a ``LoraConfig`` (PEFT stores list targets as sets)."""
    ns = dict(config, target_parameters=None)
    for field in ("target_modules", "exclude_modules"):
        if isinstance(ns[field], list):
            ns[field] = set(ns[field])
    return types.SimpleNamespace(**ns)


def outcome(result) -> str:
    if result is EXCLUDED or isinstance(result, peft_tuners_utils._ExcludedModule):
        return "excluded"
    return "targeted" if result else "no"


# ---------------------------------------------------------------------------------------------------- match_module


@FAST
@given(names_and_config())
def test_match_module_agrees_with_peft(case):
    names, config = case
    ours = types.SimpleNamespace(**config)
    theirs = peft_namespace(config)
    for name in names:
        expected = outcome(peft_tuners_utils.check_target_module_exists(theirs, name))
        got = match_module(ours, name)
        assert outcome(got) == expected, (name, config)
        event(f"outcome: {expected}")
        # jpeft's answer is exactly True, False or EXCLUDED (no regex Match objects)
        assert got is True or got is False or got is EXCLUDED


@SLOW
@given(names_and_config())
def test_match_module_agrees_with_peft_on_real_lora_configs(case):
    """The same with real ``peft.LoraConfig`` and ``jpeft.LoraConfig`` objects, where both accept the options."""
    import peft

    names, config = case
    kwargs = {k: v for k, v in config.items() if v is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs = peft.LoraConfig(**kwargs)
        except ValueError:
            theirs = None
        try:
            ours = jpeft.LoraConfig(**kwargs)
        except jpeft.ConfigError:
            ours = None
    # the option combinations PEFT refuses, jpeft refuses too
    assert (theirs is None) == (ours is None), kwargs
    event(f"real configs accepted: {theirs is not None}")
    if theirs is None:
        return
    for name in names:
        expected = outcome(peft_tuners_utils.check_target_module_exists(theirs, name))
        assert outcome(match_module(ours, name)) == expected, (name, kwargs)


@pytest.mark.parametrize(
    ("config", "name", "expected"),
    [
        # list: equal or dot-aligned suffix only
        (dict(target_modules=["q_proj"]), "model.layers.0.self_attn.q_proj", "targeted"),
        (dict(target_modules=["proj"]), "model.layers.0.self_attn.q_proj", "no"),
        (dict(target_modules=["self_attn.q_proj"]), "model.layers.0.self_attn.q_proj", "targeted"),
        # string: full match
        (dict(target_modules="q_proj"), "model.layers.0.self_attn.q_proj", "no"),
        (
            dict(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"),
            "model.layers.1.self_attn.q_proj",
            "targeted",
        ),
        # an exact full name is targeted whatever layers_to_transform says (PEFT returns early)
        (
            dict(target_modules=["model.layers.0.mlp"], layers_to_transform=[5]),
            "model.layers.0.mlp",
            "targeted",
        ),
        # the first numbered segment is the layer index, not a nested expert index
        (
            dict(target_modules=["proj"], layers_to_transform=[1]),
            "model.layers.1.experts.0.proj",
            "targeted",
        ),
        (
            dict(target_modules=["proj"], layers_to_transform=[0]),
            "model.layers.1.experts.0.proj",
            "no",
        ),
        (
            dict(target_modules=["c_attn"], layers_to_transform=0, layers_pattern="h"),
            "transformer.h.0.attn.c_attn",
            "targeted",
        ),
        (
            dict(target_modules=["c_attn"], layers_to_transform=0, layers_pattern="layers"),
            "transformer.h.0.attn.c_attn",
            "no",
        ),
        # exclusions come first; modules_to_save modules and their children are never targeted
        (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "a.q_proj", "excluded"),
        (dict(target_modules=["q_proj"], exclude_modules=r"a\..*"), "a.q_proj", "excluded"),
        (dict(target_modules=["dense"], modules_to_save=["classifier"]), "classifier.dense", "excluded"),
        (dict(target_modules=["dense"], modules_to_save=["classifier"]), "my_classifier.dense", "targeted"),
    ],
)
def test_match_module_examples(config, name, expected):
    full = dict(
        target_modules=None,
        exclude_modules=None,
        modules_to_save=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    full.update(config)
    assert outcome(match_module(types.SimpleNamespace(**full), name)) == expected
    assert outcome(peft_tuners_utils.check_target_module_exists(peft_namespace(full), name)) == expected


def test_excluded_marker_is_falsy_and_unique():
    assert not EXCLUDED
    assert EXCLUDED is targets.EXCLUDED
    ns = types.SimpleNamespace(target_modules=["x"], exclude_modules=["x"])
    assert match_module(ns, "a.x") is EXCLUDED


# ---------------------------------------------------------------------------------------------------- get_pattern_key

PATTERN_KEYS = [
    "q_proj",
    "v_proj",
    "proj",
    "layers.0.self_attn.q_proj",
    r"model\.layers\.1\.self_attn\.q_proj",
    "self_attn.q_proj",
    "q_proj|v_proj",
    ".*proj",
    r"h\.\d+\.attn\.c_attn",
    "c_attn",
    "dense",
]


@FAST
@given(
    st.lists(st.sampled_from(PATTERN_KEYS) | suffix, max_size=5, unique=True),
    module_names,
)
def test_get_pattern_key_agrees_with_peft(keys, name):
    expected = peft_other.get_pattern_key(keys, name)
    got = get_pattern_key(keys, name)
    # PEFT returns the name itself when no key matches; jpeft returns None
    event(f"pattern key matched: {got is not None}")
    if got is None:
        assert expected == name
        assert not any(re.match(rf"(.*\.)?({key})$", name) for key in keys)
    else:
        assert got == expected
        assert got in keys


def test_get_pattern_key_first_key_in_order_wins():
    name = "model.layers.0.self_attn.q_proj"
    assert get_pattern_key(["q_proj", "layers.0.self_attn.q_proj"], name) == "q_proj"
    assert get_pattern_key(["layers.0.self_attn.q_proj", "q_proj"], name) == "layers.0.self_attn.q_proj"
    assert get_pattern_key(["proj"], name) is None  # not dot-aligned
    assert get_pattern_key([], name) is None


# ---------------------------------------------------------------------------------------------------- minimal targets


@st.composite
def targets_and_others(draw):
    names = draw(st.lists(module_names, min_size=1, max_size=30, unique=True))
    chosen = draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
    if not any(chosen):
        chosen[0] = True
    target_set = [n for n, c in zip(names, chosen, strict=True) if c]
    others = [n for n, c in zip(names, chosen, strict=True) if not c]
    return target_set, others


@FAST
@given(targets_and_others())
def test_find_minimal_target_modules_agrees_with_peft(case):
    target_set, others = case
    expected = peft_tuners_utils._find_minimal_target_modules(list(target_set), list(others))
    assert find_minimal_target_modules(target_set, others) == expected


def test_find_minimal_target_modules_docstring_example():
    target_set = [f"model.decoder.layers.{i}.self_attn.q_proj" for i in range(30)]
    target_set += [f"model.decoder.layers.{i}.self_attn.v_proj" for i in range(30)]
    others = [f"model.encoder.layers.{i}.self_attn.k_proj" for i in range(30)]
    assert find_minimal_target_modules(target_set, others) == {"q_proj", "v_proj"}


# ---------------------------------------------------------------------------------------------------- modules_to_save


def test_modules_to_save_names_is_plain_endswith():
    names = [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.pooler.dense",
        "bert.pooler",
        "classifier",
        "my_classifier",
    ]
    # "ense" is not a dot-aligned suffix, but PEFT's _set_trainable uses plain endswith
    assert modules_to_save_names(["ense"], names) == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.pooler.dense",
    ]
    assert modules_to_save_names(["classifier"], names) == ["classifier", "my_classifier"]
    assert modules_to_save_names(None, names) == []
    assert modules_to_save_names([], names) == []
    # a module inside another matched module is covered by the outer one
    assert modules_to_save_names(["pooler", "dense"], names) == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.pooler",
    ]


def _torch_tree(names):
    import torch.nn as nn

    all_names = set()
    for name in names:
        parts = name.split(".")
        all_names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    root = nn.Module()
    for name in sorted(all_names, key=lambda s: (s.count("."), s)):
        *parents, last = name.split(".")
        node = root
        for part in parents:
            node = getattr(node, part)
        node.add_module(last, nn.Linear(1, 1))
    return root, [key for key, _ in root.named_modules() if key]


@SLOW
@given(
    st.lists(
        st.lists(
            st.sampled_from(["bert", "pooler", "dense", "classifier", "out_proj", "0", "1", "head"]),
            min_size=1,
            max_size=4,
        ).map(".".join),
        min_size=1,
        max_size=6,
    ),
    st.lists(
        st.sampled_from(["dense", "ense", "classifier", "head", "out_proj", "pooler.dense", "1"]),
        min_size=1,
        max_size=3,
    ),
)
def test_modules_to_save_names_agrees_with_peft_set_trainable(names, entries):
    """jpeft's list is PEFT's set of wrapped modules, minus wrappers nested inside another wrapper."""
    from peft.utils.other import ModulesToSaveWrapper, _set_trainable

    model, torch_names = _torch_tree(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _set_trainable(model, "default", entries, inference_mode=False)
    wrapped = [k for k, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    outer = [k for k in wrapped if not any(k.startswith(o + ".") for o in wrapped if o != k)]
    assert sorted(modules_to_save_names(entries, torch_names)) == sorted(outer)
    event(f"wrapped: {len(outer)}, nested dropped: {len(wrapped) - len(outer)}")


# ---------------------------------------------------------------------------------------------------- select_targets


def _info(name: str, kind: str) -> ModuleInfo:
    path = tuple(name.split("."))
    if kind == "other":
        return ModuleInfo(name=name, path=path, kind="other", type_name="Module", torch_type="Module")
    return ModuleInfo(
        name=name,
        path=path,
        kind=kind,
        type_name="Dense",
        torch_type="Linear",
        in_features=4,
        out_features=4,
        weight_name="kernel",
        param_shapes={"kernel": (4, 4)},
    )


GPT2_LIKE = {
    name: _info(name, kind)
    for name, kind in [
        ("transformer", "other"),
        ("transformer.h", "other"),
        ("transformer.h.0", "other"),
        ("transformer.h.0.attn", "other"),
        ("transformer.h.0.attn.c_attn", "linear"),
        ("transformer.h.0.attn.c_proj", "linear"),
        ("transformer.h.0.mlp", "other"),
        ("transformer.h.0.mlp.c_fc", "linear"),
        ("transformer.h.1", "other"),
        ("transformer.h.1.attn", "other"),
        ("transformer.h.1.attn.c_attn", "linear"),
        ("transformer.h.1.attn.c_proj", "linear"),
        ("transformer.h.1.mlp", "other"),
        ("transformer.h.1.mlp.c_fc", "linear"),
        ("lm_head", "linear"),
    ]
}


def _cfg(**kwargs):
    full = dict(
        target_modules=None,
        exclude_modules=None,
        modules_to_save=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    full.update(kwargs)
    return types.SimpleNamespace(**full)


def test_select_targets_in_model_order():
    got = select_targets(_cfg(target_modules=["c_proj", "c_attn"]), GPT2_LIKE)
    assert got == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.attn.c_proj",
    ]
    assert select_targets(_cfg(target_modules=["c_attn"], layers_to_transform=1), GPT2_LIKE) == [
        "transformer.h.1.attn.c_attn"
    ]


def test_select_targets_nothing_matched_lists_modules_and_target():
    with pytest.raises(jpeft.NoMatchingModuleError) as info:
        select_targets(_cfg(target_modules=["foo"]), GPT2_LIKE)
    msg = str(info.value)
    assert "Target modules {'foo'} not found in the base model" in msg
    assert "transformer.h.0.attn.c_attn" in msg and "lm_head" in msg  # existing modules are listed
    assert isinstance(info.value, ValueError)


def test_select_targets_nothing_matched_string_target_and_layer_notes():
    with pytest.raises(jpeft.NoMatchingModuleError) as info:
        select_targets(_cfg(target_modules=r".*q_proj"), GPT2_LIKE)
    assert "Target modules .*q_proj not found" in str(info.value)

    with pytest.raises(jpeft.NoMatchingModuleError) as info:
        select_targets(
            _cfg(target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="layers"), GPT2_LIKE
        )
    msg = str(info.value)
    assert "Note: You specified 'layers_to_transform': [0]." in msg
    assert "You also specified 'layers_pattern': layers." in msg


def test_select_targets_all_excluded():
    # modules_to_save covers the only candidate, and a full-match exclude regex covers everything else
    with pytest.raises(jpeft.NoMatchingModuleError, match="All modules were excluded"):
        select_targets(_cfg(target_modules=["c_attn"], exclude_modules=".*"), GPT2_LIKE)


def test_select_targets_mix_of_unmatched_and_excluded():
    with pytest.raises(jpeft.NoMatchingModuleError) as info:
        select_targets(_cfg(target_modules=["c_attn"], exclude_modules=["c_attn"]), GPT2_LIKE)
    msg = str(info.value)
    assert "No modules were targeted for adaptation" in msg
    assert "transformer.h.0.attn.c_attn" in msg  # lists existing modules

    with pytest.raises(jpeft.NoMatchingModuleError, match="No modules were targeted"):
        select_targets(_cfg(target_modules=["lm_head"], modules_to_save=["lm_head"]), GPT2_LIKE)


def test_select_targets_unsupported_kind_names_module():
    with pytest.raises(jpeft.NoMatchingModuleError) as info:
        select_targets(_cfg(target_modules=["attn"]), GPT2_LIKE)
    assert "transformer.h.0.attn" in str(info.value)


def test_select_targets_warns_when_exclude_excludes_nothing():
    with pytest.warns(UserWarning, match=r"exclude_modules=\['nothing_here'\] but no modules were excluded"):
        got = select_targets(_cfg(target_modules=["c_attn"], exclude_modules=["nothing_here"]), GPT2_LIKE)
    assert len(got) == 2


def _error_kind(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    msg = str(exc)
    for key, kind in [
        ("All modules were excluded", "all-excluded"),
        ("No modules were targeted", "mix"),
        ("not found in the base model", "not-found"),
    ]:
        if key in msg:
            return kind
    return "unsupported"


@SLOW
@given(names_and_config())
def test_select_targets_error_kind_agrees_with_peft_injection(case):
    """Which of PEFT's errors (if any) a config gives, by running PEFT's injection on a torch twin."""
    import peft

    names, config = case
    if config["layers_pattern"] is not None and config["layers_to_transform"] is None:
        return
    model, torch_names = _torch_tree(names)
    kinds = {
        n: ("linear" if not any(o.startswith(n + ".") for o in torch_names) else "other") for n in torch_names
    }
    # containers are plain nn.Module in the twin: replace them so PEFT sees an unsupported module type
    import torch.nn as nn

    for name, kind in kinds.items():
        if kind == "other":
            *parents, last = name.split(".")
            node = model
            for part in parents:
                node = getattr(node, part)
            container = nn.Module()
            for child_name, child in getattr(node, last).named_children():
                container.add_module(child_name, child)
            setattr(node, last, container)
    modules = {n: _info(n, kinds[n]) for n in torch_names}
    kwargs = {k: v for k, v in config.items() if v is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            peft_config = peft.LoraConfig(**kwargs)
        except ValueError:
            return
        try:
            peft.inject_adapter_in_model(peft_config, model)
            theirs = None
        except ValueError as err:
            theirs = err
        try:
            select_targets(jpeft.LoraConfig(**kwargs), modules)
            ours = None
        except jpeft.NoMatchingModuleError as err:
            ours = err
    assert _error_kind(ours) == _error_kind(theirs), (names, kwargs, str(theirs)[:200], str(ours)[:200])
    event(f"injection: {_error_kind(theirs)}")
