"""Adapter folders: safe reads, clear errors naming the file, strict loading, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft.interop import checkpoint
from tests import parity

PREFIX = "base_model.model."
KEY_A0 = PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"
KEY_B0 = PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight"
KEY_B1 = PREFIX + "transformer.h.1.attn.c_attn.lora_B.weight"
ALL_KEYS = {PREFIX + f"transformer.h.{i}.attn.c_attn.lora_{ab}.weight" for i in (0, 1) for ab in ("A", "B")}


def _config(r=4, **kwargs):
    # fan_in_fan_out=True: what jpeft (and PEFT) set for GPT-2 Conv1D targets anyway, without the warning
    return jpeft.LoraConfig(r=r, target_modules=["c_attn"], fan_in_fan_out=True, **kwargs)


@pytest.fixture(scope="module")
def flax_model(tiny):
    return tiny("gpt2").flax_model


def _model(flax_model, r=4, seed=1, **kwargs):
    model = jpeft.get_peft_model(flax_model, _config(r, **kwargs))
    parity.perturb_jpeft_adapter(model, seed=seed)  # B != 0, so a load that kept the fresh init shows
    return model


@pytest.fixture(scope="module")
def saved(flax_model, tmp_path_factory):
    """A folder holding one saved r=4 adapter, and the model that wrote it (read-only for tests)."""
    folder = tmp_path_factory.mktemp("saved")
    model = _model(flax_model)
    model.save_pretrained(folder)
    return folder, model


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (dest / name).write_bytes((folder / name).read_bytes())
    return dest


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- round trip


def test_round_trip_restores_weights(saved, flax_model):
    folder, model = saved
    loaded = jpeft.PeftModel.from_pretrained(flax_model, folder)
    _assert_trees_equal(loaded.adapters["default"], model.adapters["default"])
    assert loaded.peft_config["default"].inference_mode is True
    trainable = jpeft.PeftModel.from_pretrained(flax_model, folder, is_trainable=True)
    assert trainable.peft_config["default"].inference_mode is False


def test_saved_file_metadata_and_dtypes(saved):
    folder, _ = saved
    with safe_open(folder / "adapter_model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == ALL_KEYS
    assert all(t.dtype == np.float32 for t in tensors.values())
    # torch layout: lora_A (r, in), lora_B (out, r) even for GPT-2's Conv1D
    assert tensors[KEY_A0].shape == (4, 32) and tensors[KEY_B0].shape == (96, 4)


@pytest.mark.parametrize(
    "dtype",
    [
        jnp.float16,
        jnp.bfloat16,
    ],
)
def test_low_precision_adapter_is_saved_as_float32(flax_model, tmp_path, dtype):
    model = _model(flax_model)
    params = model.params
    params["adapters"]["default"] = jax.tree.map(lambda x: x.astype(dtype), params["adapters"]["default"])
    model.params = params
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    expected = np.asarray(
        params["adapters"]["default"]["lora"]["transformer.h.0.attn.c_attn"]["lora_A"], np.float32
    )
    np.testing.assert_array_equal(tensors[KEY_A0], expected.T)


def test_model_card(saved):
    folder, _ = saved
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    front = card.split("---")[1]
    assert "library_name: peft" in front.splitlines()
    assert "- lora" in front


# ---------------------------------------------------------------------------------------------------- pickle refusal


class _CreatesMarker:
    """Unpickling this runs ``open(marker, "w")``: proof that a loader unpickled the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weights": _CreatesMarker(str(marker))})


def test_payload_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "proof"
    handle = pickle.loads(_evil_pickle(marker))["weights"]  # noqa: S301 - that is the point
    handle.close()
    assert marker.exists()


def test_pickle_only_folder_is_refused_without_unpickling(saved, flax_model, tmp_path):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((saved[0] / "adapter_config.json").read_bytes())
    marker = tmp_path / "marker"
    (folder / "adapter_model.bin").write_bytes(_evil_pickle(marker))
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, folder)
    msg = str(info.value)
    assert "pickle" in msg and "adapter_model.bin" in msg and str(folder) in msg
    assert not marker.exists()

    model = _model(flax_model)
    with pytest.raises(jpeft.CheckpointError, match="pickle"):
        model.load_adapter(folder, "other")
    assert not marker.exists()
    assert list(model.adapters) == ["default"]


def test_pickle_beside_safetensors_is_never_opened(saved, flax_model, tmp_path):
    folder = _copy(saved[0], tmp_path / "both")
    marker = tmp_path / "marker"
    (folder / "adapter_model.bin").write_bytes(_evil_pickle(marker))
    loaded = jpeft.PeftModel.from_pretrained(flax_model, folder)
    _assert_trees_equal(loaded.adapters["default"], saved[1].adapters["default"])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- folder errors


def test_missing_folder(flax_model, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, missing)
    assert str(missing) in str(info.value)
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, tmp_path, subfolder="nope")
    assert str(missing) in str(info.value)


def test_folder_is_a_file(flax_model, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(jpeft.CheckpointError, match="file"):
        jpeft.PeftModel.from_pretrained(flax_model, path)


def test_folder_without_config(saved, flax_model, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, folder)
    msg = str(info.value)
    assert str(folder) in msg and "adapter_config.json" in msg
    assert "subfolder" not in msg


def test_folder_without_config_hints_at_subfolders(saved, flax_model, tmp_path):
    folder = tmp_path / "multi"
    _copy(saved[0], folder / "zeta")
    _copy(saved[0], folder / "alpha")
    (folder / "unrelated").mkdir()
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, folder)
    msg = str(info.value)
    assert str(folder) in msg
    assert "(alpha, zeta)" in msg and "subfolder=" in msg
    assert "unrelated" not in msg
    # and the hint works
    loaded = jpeft.PeftModel.from_pretrained(flax_model, folder, subfolder="alpha")
    _assert_trees_equal(loaded.adapters["default"], saved[1].adapters["default"])


def test_missing_safetensors(saved, flax_model, tmp_path):
    folder = _copy(saved[0], tmp_path / "nosafe")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, folder)
    assert str(folder) in str(info.value) and "adapter_model.safetensors" in str(info.value)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated-half"),
        pytest.param(lambda b: b[:-4], id="truncated-tail"),
        pytest.param(lambda b: b[:5], id="truncated-header"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"\xff" * 64, id="garbage"),
        pytest.param(lambda b: b[:8] + b"{not json" + b[17:], id="bad-header-json"),
    ],
)
def test_corrupt_safetensors(saved, flax_model, tmp_path, corrupt):
    folder = _copy(saved[0], tmp_path / "corrupt")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, folder)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"peft_type": "LORA", "r": 4,', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'["LORA"]', "JSON object"),
    ],
)
def test_invalid_config_json(saved, flax_model, tmp_path, content, needle):
    folder = _copy(saved[0], tmp_path / "badjson")
    path = folder / "adapter_config.json"
    path.write_bytes(content)
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, folder)
    assert str(path) in str(info.value) and needle in str(info.value)


# ---------------------------------------------------------------------------------------------------- mismatches


def test_shape_mismatch_via_config_argument(saved, flax_model):
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, saved[0], config=_config(r=2))
    msg = str(info.value)
    assert KEY_A0 in msg and KEY_B0 in msg
    assert "(4, 32)" in msg and "(2, 32)" in msg  # lora_A: checkpoint vs model
    assert "(96, 4)" in msg and "(96, 2)" in msg  # lora_B
    assert str(saved[0]) in msg


def test_shape_mismatch_via_edited_json(saved, flax_model, tmp_path):
    folder = _copy(saved[0], tmp_path / "edited")
    data = json.loads((folder / "adapter_config.json").read_text())
    data["r"] = 2
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, folder)
    assert KEY_A0 in str(info.value) and "(4, 32)" in str(info.value) and "(2, 32)" in str(info.value)


def test_ignore_mismatched_sizes_warns_and_skips(saved, flax_model):
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes") as record:
        loaded = jpeft.PeftModel.from_pretrained(
            flax_model, saved[0], config=_config(r=2), ignore_mismatched_sizes=True
        )
    text = "\n".join(str(w.message) for w in record)
    for key in ALL_KEYS:
        assert key in text
    assert "(4, 32)" in text and "(2, 32)" in text
    # every tensor was skipped: the adapter keeps its fresh (default-key) initialisation
    fresh = jpeft.get_peft_model(flax_model, _config(r=2))
    _assert_trees_equal(loaded.adapters["default"], fresh.adapters["default"])


def _rewrite(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(edit(tensors), path, metadata={"format": "pt"})


def test_missing_key_is_an_error(saved, flax_model, tmp_path):
    folder = _copy(saved[0], tmp_path / "missing")
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if k != KEY_B1})
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, folder)
    msg = str(info.value)
    assert "missing adapter keys" in msg and KEY_B1 in msg and str(folder) in msg
    assert KEY_A0 not in msg
    assert "prefix" not in msg


def test_keys_without_prefix_say_so(saved, flax_model, tmp_path):
    folder = _copy(saved[0], tmp_path / "noprefix")
    _rewrite(folder, lambda t: {k.removeprefix(PREFIX): v for k, v in t.items()})
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(flax_model, folder)
    msg = str(info.value)
    assert "'base_model.model.'" in msg and "prefix" in msg
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in msg


def test_unexpected_keys_warn(saved, flax_model, tmp_path):
    folder = _copy(saved[0], tmp_path / "extra")
    extra = PREFIX + "transformer.h.0.mlp.c_fc.lora_A.weight"
    _rewrite(folder, lambda t: {**t, extra: np.zeros((4, 32), np.float32)})
    with pytest.warns(UserWarning, match="Unexpected keys") as record:
        loaded = jpeft.PeftModel.from_pretrained(flax_model, folder)
    assert any(extra in str(w.message) for w in record)
    _assert_trees_equal(loaded.adapters["default"], saved[1].adapters["default"])


def test_failed_load_adapter_leaves_model_unchanged(saved, flax_model, tmp_path):
    folder = _copy(saved[0], tmp_path / "missing2")
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if k != KEY_B1})
    model = _model(flax_model)
    with pytest.raises(jpeft.CheckpointError):
        model.load_adapter(folder, "other")
    assert list(model.adapters) == ["default"] and list(model.peft_config) == ["default"]


# ---------------------------------------------------------------------------------------------------- adapter names

BAD_NAMES = ["../x", "a/b", "..", "", "/tmp/jpeft-abs", ".", "a\\b", "x/../../y", "../../etc"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_escaping_adapter_names_are_refused(flax_model, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="adapter name"):
        jpeft.get_peft_model(flax_model, _config(), adapter_name=name)
    model = jpeft.get_peft_model(flax_model, _config())
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, _config(r=2))
    assert list(model.adapters) == ["default"] and list(model.peft_config) == ["default"]
    # nothing was written anywhere near the working folder
    assert list(tmp_path.iterdir()) == []
    assert not Path("/tmp/jpeft-abs").exists()


@pytest.mark.parametrize("name", ["README.md", "adapter_config.json", "adapter_model.safetensors"])
def test_adapter_names_colliding_with_layout_files_are_refused(flax_model, name):
    model = jpeft.get_peft_model(flax_model, _config())
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, _config(r=2))


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
def test_escaping_names_refused_on_load(saved, flax_model, name):
    with pytest.raises(ValueError, match="adapter name"):
        jpeft.PeftModel.from_pretrained(flax_model, saved[0], adapter_name=name)
    model = jpeft.get_peft_model(flax_model, _config())
    with pytest.raises(ValueError, match="adapter name"):
        model.load_adapter(saved[0], name)


# ---------------------------------------------------------------------------------------------------- atomic save


def test_save_over_existing_folder_replaces_both_files(flax_model, tmp_path):
    first = _model(flax_model, r=4, seed=1)
    second = _model(flax_model, r=2, seed=2)
    folder = tmp_path / "out"
    first.save_pretrained(folder)
    second.save_pretrained(folder)
    reference = tmp_path / "reference"
    second.save_pretrained(reference)
    assert _snapshot(folder) == _snapshot(reference)
    assert not list(folder.glob(".jpeft-staging-*"))
    loaded = jpeft.PeftModel.from_pretrained(flax_model, folder)
    assert loaded.peft_config["default"].r == 2
    _assert_trees_equal(loaded.adapters["default"], second.adapters["default"])


def _failing_replace(monkeypatch, succeed: int):
    real = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        # the (succeed + 1)-th move fails; later ones (the rollback's) work, as after a transient error
        calls.append(dst)
        if len(calls) == succeed + 1:
            raise OSError(5, "Input/output error (simulated)")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    return calls


def test_save_failing_before_any_replace_changes_nothing(flax_model, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    _model(flax_model, r=4, seed=1).save_pretrained(folder)
    before = _snapshot(folder)
    calls = _failing_replace(monkeypatch, 0)
    with pytest.raises(OSError):
        _model(flax_model, r=2, seed=2).save_pretrained(folder)
    assert calls  # the failure did happen inside write_files
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert not list(folder.glob(".jpeft-staging-*"))
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize("succeed", [1, 2])
def test_save_failing_mid_way_keeps_old_files(flax_model, tmp_path, monkeypatch, succeed):
    folder = tmp_path / "out"
    _model(flax_model, r=4, seed=1).save_pretrained(folder)
    before = _snapshot(folder)
    calls = _failing_replace(monkeypatch, succeed)
    with pytest.raises(OSError):
        _model(flax_model, r=2, seed=2).save_pretrained(folder)
    assert len(calls) >= succeed + 1  # then the rollback moves the backups back
    monkeypatch.undo()
    assert not list(folder.glob(".jpeft-staging-*"))
    assert _snapshot(folder) == before
    # the folder still loads as the first adapter
    assert jpeft.PeftModel.from_pretrained(flax_model, folder).peft_config["default"].r == 4


def test_save_failing_in_serialization_changes_nothing(flax_model, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    _model(flax_model, r=4, seed=1).save_pretrained(folder)
    before = _snapshot(folder)

    def boom(*args, **kwargs):
        raise RuntimeError("serialization failed (simulated)")

    monkeypatch.setattr(checkpoint, "serialize_tensors", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        _model(flax_model, r=2, seed=2).save_pretrained(folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert not list(folder.glob(".jpeft-staging-*"))


def test_save_failing_while_writing_staged_file_cleans_up(flax_model, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    _model(flax_model, r=4, seed=1).save_pretrained(folder)
    before = _snapshot(folder)
    real_fsync = os.fsync
    count = []

    def fsync(fd):
        count.append(fd)
        if len(count) == 2:  # the second staged file
            raise OSError(5, "I/O error (simulated)")
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    with pytest.raises(OSError, match="simulated"):
        _model(flax_model, r=2, seed=2).save_pretrained(folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert not list(folder.glob(".jpeft-staging-*"))


def test_save_to_a_file_path_raises(saved, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("keep me")
    with pytest.raises(jpeft.CheckpointError) as info:
        saved[1].save_pretrained(path)
    assert str(path) in str(info.value)
    assert path.read_text() == "keep me"


def test_save_below_a_file_path_raises_checkpoint_error(saved, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("keep me")
    with pytest.raises(jpeft.CheckpointError) as info:
        saved[1].save_pretrained(path / "sub")
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------- save options


def test_safe_serialization_false_raises(saved, tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        saved[1].save_pretrained(tmp_path / "out", safe_serialization=False)
    assert not (tmp_path / "out").exists()


def test_unknown_selected_adapter_raises(saved, tmp_path):
    with pytest.raises(ValueError, match="nope"):
        saved[1].save_pretrained(tmp_path / "out", selected_adapters=["default", "nope"])
    assert not (tmp_path / "out").exists()


def test_non_default_adapters_use_subfolders(flax_model, tmp_path):
    model = _model(flax_model, r=4, seed=1)
    model.add_adapter("other", _config(r=2))
    parity.perturb_jpeft_adapter(model, adapter="other", seed=3)
    folder = tmp_path / "multi"
    model.save_pretrained(folder)
    assert sorted(_snapshot(folder)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "other/adapter_config.json",
        "other/adapter_model.safetensors",
    ]
    # keys inside the subfolder carry no adapter name
    assert set(load_file(folder / "other" / "adapter_model.safetensors")) == ALL_KEYS
    assert json.loads((folder / "other" / "adapter_config.json").read_text())["r"] == 2

    loaded = jpeft.PeftModel.from_pretrained(flax_model, folder, subfolder="other")
    _assert_trees_equal(loaded.adapters["default"], model.adapters["other"])
    loaded.load_adapter(folder, "other", subfolder="other")
    _assert_trees_equal(loaded.adapters["other"], model.adapters["other"])
    root = jpeft.PeftModel.from_pretrained(flax_model, folder)
    _assert_trees_equal(root.adapters["default"], model.adapters["default"])

    only = tmp_path / "only_other"
    model.save_pretrained(only, selected_adapters=["other"])
    assert sorted(_snapshot(only)) == [
        "README.md",
        "other/adapter_config.json",
        "other/adapter_model.safetensors",
    ]


def test_not_main_process_writes_nothing(saved, tmp_path):
    saved[1].save_pretrained(tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out").exists()


def test_saved_folder_loads_in_torch_peft(saved, tiny):
    """The same folder is a valid torch PEFT adapter (no missing keys)."""
    pair = tiny("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = parity.torch_peft_load(pair, saved[0])
    state = {k: v for k, v in model.state_dict().items() if "lora_A" in k}
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
    np.testing.assert_array_equal(
        state[key].numpy(), load_file(saved[0] / "adapter_model.safetensors")[KEY_A0]
    )
