"""transformers model folders: safetensors read through memmaps, written as ``save_pretrained`` does."""

from __future__ import annotations

import json
import mmap
import os
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import jpeft
from jpeft.interop import hf_checkpoint as hfc

CONFIG = {"model_type": "toy", "hidden_size": 4, "architectures": ["Toy"]}


def _mixed() -> dict[str, np.ndarray]:
    """fp32, bf16 and fp16 (plus ints, bool, a scalar) of 400-800 bytes each."""
    rng = np.random.default_rng(0)
    return {
        "a.fp32": rng.standard_normal((10, 20)).astype(np.float32),  # 800 bytes
        "b.bf16": rng.standard_normal((20, 20)).astype(ml_dtypes.bfloat16),  # 800
        "c.fp16": rng.standard_normal((400,)).astype(np.float16),  # 800
        "d.i64": np.arange(60, dtype=np.int64).reshape(3, 20),  # 480
        "e.bool": rng.random((4, 100)) > 0.5,  # 400
        "f.u8": np.arange(400, dtype=np.uint8),  # 400
        "g.scalar": np.array(1.5, np.float64),  # 8
    }


def _assert_same(index: hfc.TensorIndex, tensors: dict[str, np.ndarray]) -> None:
    assert sorted(index.names) == sorted(tensors)
    for name, expected in tensors.items():
        got = index.read(name)
        assert index.shape(name) == expected.shape and got.shape == expected.shape
        assert index.dtype(name) == expected.dtype and got.dtype == expected.dtype
        assert got.tobytes() == expected.tobytes(), name


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --------------------------------------------------------------------------- round trips


def test_round_trip_single_file(tmp_path):
    tensors = _mixed()
    out = hfc.write_model(tmp_path / "m", CONFIG, tensors, generation_config={"do_sample": False})
    assert _files(out) == {"config.json", "generation_config.json", "model.safetensors"}
    assert hfc.read_model_config(out) == CONFIG
    assert (out / "config.json").read_text() == json.dumps(CONFIG, indent=2, sort_keys=True) + "\n"
    with safe_open(out / "model.safetensors", framework="numpy") as handle:
        assert handle.metadata() == {"format": "pt"}
    index = hfc.open_checkpoint(hfc.resolve_model_folder(out))
    _assert_same(index, tensors)
    assert index.dtype("b.bf16") == np.dtype(ml_dtypes.bfloat16)
    assert "a.fp32" in index and "nope" not in index and len(index) == len(tensors)
    assert index.file_of("c.fp16") == out / "model.safetensors"
    with pytest.raises(KeyError, match="nope"):
        index.read("nope")


def test_round_trip_three_shards_streamed_matches_huggingface_hub_split(tmp_path):
    from huggingface_hub import split_state_dict_into_shards_factory

    tensors = _mixed()
    tensors["h.big"] = np.ones((700,), np.float32)  # 2800 bytes > max: its own shard, ahead of the open one
    order = ["a.fp32", "h.big", "b.bf16", "c.fp16", "d.i64", "e.bool", "f.u8", "g.scalar"]
    tensors = {name: tensors[name] for name in order}
    out = hfc.write_model(tmp_path, CONFIG, ((k, v) for k, v in tensors.items()), max_shard_size=1700)
    expected = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda a: a.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=1700,
    )
    names = [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert _files(out) == {"config.json", "model.safetensors.index.json", *names}
    index_text = (out / "model.safetensors.index.json").read_text()
    index_json = json.loads(index_text)
    assert index_text == json.dumps(index_json, indent=2, sort_keys=True) + "\n"
    assert index_json["weight_map"] == expected.tensor_to_filename
    assert index_json["weight_map"]["h.big"] == names[0]  # the quirk of huggingface_hub's splitter
    assert index_json["metadata"] == {
        "total_parameters": sum(a.size for a in tensors.values()),
        "total_size": expected.metadata["total_size"],
    }
    for name in names:
        with safe_open(out / name, framework="numpy") as handle:
            assert handle.metadata() == {"format": "pt"}
    index = hfc.open_checkpoint(out)
    _assert_same(index, tensors)
    assert [index.file_of(k).name for k in ("a.fp32", "b.bf16", "c.fp16")] == [names[1], names[1], names[2]]


def test_rewrite_drops_stale_shards_and_a_failed_write_changes_nothing(tmp_path):
    tensors = _mixed()
    hfc.write_model(tmp_path, CONFIG, tensors)
    hfc.write_model(
        tmp_path, CONFIG, tensors, max_shard_size="1KB"
    )  # transformers would keep model.safetensors
    shards = {f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)}
    assert _files(tmp_path) == {"config.json", "model.safetensors.index.json", *shards}
    hfc.write_model(tmp_path, {**CONFIG, "hidden_size": 8}, tensors)
    assert _files(tmp_path) == {"config.json", "model.safetensors"}
    assert hfc.read_model_config(tmp_path)["hidden_size"] == 8
    before = {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)}

    def failing():
        yield "a", np.zeros(300, np.float32)
        raise RuntimeError("the producer broke")

    with pytest.raises(RuntimeError, match="producer"):
        hfc.write_model(tmp_path, CONFIG, failing(), max_shard_size=1000)
    assert {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)} == before
    with pytest.raises(jpeft.CheckpointError, match="repeated"):
        hfc.write_model(tmp_path, CONFIG, [("x", np.zeros(2)), ("x", np.zeros(2))])
    with pytest.raises(jpeft.CheckpointError, match="safetensors cannot hold"):
        hfc.write_model(tmp_path, CONFIG, {"z": np.zeros(2, np.complex64)})
    assert {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)} == before


def test_parse_size():
    assert hfc.parse_size("5GB") == 5 * 10**9
    assert hfc.parse_size("500MB") == 500 * 10**6
    assert hfc.parse_size("2GiB") == 2 * 2**30
    assert hfc.parse_size(" 10kb ") == 10_000
    assert hfc.parse_size(1234) == 1234
    for bad in ("5 GBs", "GB", "-1MB", 0, "0MB"):
        with pytest.raises(ValueError):
            hfc.parse_size(bad)


# --------------------------------------------------------------------------- reads


def test_read_maps_one_tensor_read_only(tmp_path):
    big = np.arange(1 << 20, dtype=np.float32)  # 4 MiB that reading "small" must not touch
    small = np.arange(6, dtype=np.float16).reshape(2, 3)
    tensors: dict[str, np.ndarray] = {"big": big, "small": small}
    hfc.write_model(tmp_path, CONFIG, tensors)
    array = hfc.open_checkpoint(tmp_path).read("small")
    np.testing.assert_array_equal(array, small)
    assert isinstance(array.base, np.memmap) and not array.flags.writeable
    mapped = getattr(array.base, "_mmap")  # noqa: B009  (numpy's mmap object: only this tensor's pages)
    assert len(mapped) <= small.nbytes + mmap.ALLOCATIONGRANULARITY
    with pytest.raises(ValueError, match="read-only"):
        array[0, 0] = 1


def test_truncated_shard_is_an_error_naming_file_and_tensor(tmp_path):
    hfc.write_model(tmp_path, CONFIG, _mixed(), max_shard_size=1700)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    header = json.loads(shard.read_bytes()[8 : 8 + int.from_bytes(shard.read_bytes()[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    os.truncate(shard, shard.stat().st_size - 3)
    with pytest.raises(jpeft.CheckpointError, match="model-00002-of-00003.safetensors.*truncated") as info:
        hfc.open_checkpoint(tmp_path)
    assert repr(last) in str(info.value)


def test_index_errors_missing_shard_and_misplaced_key(tmp_path):
    hfc.write_model(tmp_path, CONFIG, _mixed(), max_shard_size=1700)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["a.fp32"] = "model-00002-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(jpeft.CheckpointError, match="'a.fp32'.*model-00002-of-00003.safetensors.*lacks it"):
        hfc.open_checkpoint(tmp_path)
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(jpeft.CheckpointError, match="model-00003-of-00003.safetensors.*missing"):
        hfc.open_checkpoint(tmp_path)


def test_lone_safetensors_file_without_index(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones(3, np.float32)}, tmp_path / "weights.safetensors")
    np.testing.assert_array_equal(hfc.open_checkpoint(tmp_path).read("w"), np.ones(3))
    save_file({"v": np.ones(3, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(
        jpeft.CheckpointError, match="2 safetensors files but no model.safetensors.index.json"
    ):
        hfc.open_checkpoint(tmp_path)


def test_pickle_only_folder_is_refused_unread(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
    for call in (hfc.resolve_model_folder, hfc.open_checkpoint):
        with pytest.raises(
            jpeft.CheckpointError, match="pytorch_model.bin.*safetensors only.*safe_serialization"
        ):
            call(tmp_path)


def test_config_errors(tmp_path):
    with pytest.raises(jpeft.CheckpointError, match="no config.json"):
        hfc.read_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(jpeft.CheckpointError, match="not valid JSON"):
        hfc.read_model_config(tmp_path)
    for call in (hfc.resolve_model_folder, hfc.open_checkpoint):
        with pytest.raises(jpeft.CheckpointError, match="no model folder"):
            call(tmp_path / "absent")


# --------------------------------------------------------------------------- the Hub cache


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE set in the environment only (huggingface_hub read it at import as unset)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.chdir(tmp_path)  # "user/tiny" is no local folder
    return tmp_path / "hub-cache"


def test_offline_uncached_repo_fails_fast(offline_hub):
    start = time.monotonic()
    with pytest.raises(jpeft.CheckpointError, match="'user/tiny'.*HF_HUB_OFFLINE"):
        hfc.resolve_model_folder("user/tiny", cache_dir=offline_hub)
    assert time.monotonic() - start < 2


def test_unreachable_hub_is_not_reported_as_offline(offline_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(jpeft.CheckpointError, match="'user/tiny'.*could not be reached") as info:
        hfc.resolve_model_folder("user/tiny", cache_dir=offline_hub)
    assert "HF_HUB_OFFLINE" not in str(info.value)


def test_offline_cached_repo_resolves_to_snapshot(offline_hub):
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--user--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = hfc.write_model(repo / "snapshots" / sha, CONFIG, {"w": np.ones(2, np.float32)})
    assert hfc.resolve_model_folder("user/tiny", cache_dir=offline_hub) == snapshot


# --------------------------------------------------------------------------- transformers (torch)


@pytest.fixture(scope="module")
def llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _torch_state(model, dtype=None) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for name, tensor in model.state_dict().items():
        if dtype == "bfloat16":
            out[name] = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


@pytest.mark.parametrize("max_shard_size", ["5GB", "20KB"])
def test_transformers_checkpoint_opens(llama, tmp_path, max_shard_size):
    llama.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_size == "20KB")
    folder = hfc.resolve_model_folder(tmp_path)
    assert hfc.read_model_config(folder)["model_type"] == "llama"
    _assert_same(hfc.open_checkpoint(folder), _torch_state(llama))


@pytest.mark.parametrize(("max_shard_size", "dtype"), [("5GB", None), ("20KB", None), ("5GB", "bfloat16")])
def test_jpeft_folder_loads_in_transformers(llama, tmp_path, max_shard_size, dtype):
    import torch
    import transformers

    config = llama.config.to_dict()
    hfc.write_model(tmp_path / "jpeft", config, _torch_state(llama, dtype), max_shard_size=max_shard_size)
    torch_dtype = torch.bfloat16 if dtype else torch.float32
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "jpeft", dtype=torch_dtype)
    assert loaded.config.to_dict()["num_hidden_layers"] == 2
    for name, tensor in llama.state_dict().items():
        expected = tensor.to(torch.bfloat16) if dtype else tensor
        assert torch.equal(loaded.state_dict()[name], expected), name
    if max_shard_size == "20KB":  # the index is byte for byte transformers' own
        llama.save_pretrained(tmp_path / "torch", max_shard_size=max_shard_size)
        names = "model.safetensors.index.json"
        assert (tmp_path / "jpeft" / names).read_text() == (tmp_path / "torch" / names).read_text()
        assert _files(tmp_path / "jpeft") - {"config.json"} == _files(tmp_path / "torch") - {
            "config.json",
            "generation_config.json",
        }
